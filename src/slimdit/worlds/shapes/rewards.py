"""The shapes world's rewards for ``slimdit reward``, all on training prompts only (an evaluation prompt is
refused, so tuning never sees one): the detector's verdict and partial credit (for policy gradients), and, with
gradients into the images (for direct reward fine-tuning), the shapes embedder's caption-image cosine, the embedder
as a zero-shot classifier among a caption's near misses, and the detector made soft (:mod:`.soft_count`)."""

from __future__ import annotations

import numpy as np
import torch

from slimdit.worlds.shapes.detector import detect, prompt_credit, prompt_holds
from slimdit.worlds.shapes.prompts import eval_prompts, parse_prompt


def _training_prompts_only(captions: list[str]) -> None:
    held_out = {p.text for p in eval_prompts()}
    seen = sorted({c for c in captions if c in held_out})
    if seen:
        raise ValueError(f"reward asked about {len(seen)} evaluation prompt(s) ({seen[0]!r}, ...): reward tuning "
                         "runs on training prompts only (shapes-train), never on shapes-geneval's")


def embedder_reward():
    """The shapes embedder's caption-image cosine similarity as a differentiable reward ``(captions, images
    (N, 3, 32, 32) in [-1, 1]) -> (N,)``, for training prompts only (evaluation prompts are refused)."""
    from slimdit.worlds.shapes.embedder import load_shapes_embedder

    emb = load_shapes_embedder().requires_grad_(False)

    def reward(captions: list[str], images: torch.Tensor) -> torch.Tensor:
        _training_prompts_only(captions)
        emb.to(images.device)
        text = torch.nn.functional.normalize(emb.embed_texts(list(captions)).to(images.device), dim=-1)
        return (torch.nn.functional.normalize(emb.image(images.float()), dim=-1) * text).sum(-1)

    return reward


def embedder_choice_reward():
    """The shapes embedder as a zero-shot classifier, a differentiable reward ``(captions, images (N, 3, 32, 32) in
    [-1, 1]) -> (N,)``: the log-probability, at the embedder's own logit scale, that it picks each image's caption
    among every caption of the same category in the same phrasing (:func:`caption_alternatives`). Where the plain
    cosine of ``shapes-embedder`` says how much an image looks like its caption, this says how much more than like
    its near misses: another count, colour, size or shape, the mistakes the detector fails. Differences the
    embedder does not see (which colour sits on which shape, who stands where) leave it flat. Training prompts
    only."""
    from slimdit.worlds.shapes.embedder import load_shapes_embedder
    from slimdit.worlds.shapes.prompts import caption_alternatives

    emb = load_shapes_embedder().requires_grad_(False)
    texts_seen: dict[str, torch.Tensor] = {}  # caption -> its unit text embedding (the text tower is frozen)

    def text_embeddings(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in texts_seen]
        if new:
            with torch.no_grad():
                texts_seen.update(zip(new, torch.nn.functional.normalize(emb.embed_texts(new), dim=-1).cpu()))
        return torch.stack([texts_seen[t] for t in texts])

    def reward(captions: list[str], images: torch.Tensor) -> torch.Tensor:
        _training_prompts_only(captions)
        emb.to(images.device)
        img = torch.nn.functional.normalize(emb.image(images.float()), dim=-1)
        scale = emb.logit_scale.detach().exp()
        out = []
        for k, caption in enumerate(captions):
            texts, true = caption_alternatives(caption)
            logits = scale * (text_embeddings(texts).to(img.device) @ img[k])
            out.append(logits.log_softmax(0)[true])
        return torch.stack(out)

    return reward


def soft_count_reward():
    """The detector made soft (:mod:`~slimdit.worlds.shapes.soft_count`) as a differentiable reward ``(captions,
    images (N, 3, 32, 32) in [-1, 1]) -> (N,)``: minus how far the soft object count, and the areas and perimeters
    per colour and in all, lie outside what the caption allows. 0 for the right objects; training prompts only."""
    from slimdit.worlds.shapes.soft_count import penalty

    def reward(captions: list[str], images: torch.Tensor) -> torch.Tensor:
        _training_prompts_only(captions)
        return -penalty([parse_prompt(c) for c in captions], images)

    return reward


def geneval_reward(captions: list[str], images: np.ndarray) -> np.ndarray:
    """The benchmark's per-image verdict as a reward (1 when the detector finds exactly the prompt's objects and
    relation, else 0), for training prompts only: an evaluation prompt is refused, so tuning never sees them."""
    _training_prompts_only(captions)
    return np.array([float(prompt_holds(parse_prompt(c), detect(img))) for c, img in zip(captions, images)],
                    dtype=np.float32)


def geneval_credit_reward(captions: list[str], images: np.ndarray) -> np.ndarray:
    """The detector's partial credit (:func:`~slimdit.worlds.shapes.detector.prompt_credit`): 1 exactly when the
    benchmark's verdict is, and a share of the prompt's objects, attributes and relation otherwise; training
    prompts only."""
    _training_prompts_only(captions)
    return np.array([prompt_credit(parse_prompt(c), detect(img)) for c, img in zip(captions, images)],
                    dtype=np.float32)
