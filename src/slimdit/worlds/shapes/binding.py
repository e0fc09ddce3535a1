"""Does an image token read its own object's colour word? A probe of attribute binding in a Flux pipeline.

For prompts "a C1 S1 and a C2 S2" the pipeline samples as it would for an evaluation, while every joint attention
(each double and single block, the conditional pass only) records how much each image token attends to each text
token. Each image token is then labelled by the colour its patch ends up with (the nearer of C1 and C2, or neither).
A model that binds has the tokens that end up C1 attend to the word C1 more than to C2 (and the reverse) while the
layout forms, in the first steps. Reported per block: the mean attention to the right and to the wrong colour word
over those steps, the share of images where both colours appear at all (a model that does not bind often
paints both objects one colour), and how sharp the image tokens' attention to text can be: their largest logit to
a text token, which Flux's query/key RMSNorms bound by sqrt(head_dim) times the norms' largest weights.

Joint attention probabilities are not exposed by diffusers, so the probe wraps the attention function of
``diffusers.models.transformers.transformer_flux`` while it samples (restored afterwards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from slimdit.worlds.shapes.scenes import COLORS

#: two objects of different colours and shapes, as the evaluation's colour-attribute prompts are made
PAIRS = (("green", "square", "red", "circle"), ("blue", "triangle", "yellow", "square"),
         ("red", "circle", "cyan", "triangle"), ("green", "circle", "blue", "square"),
         ("magenta", "triangle", "green", "square"), ("yellow", "circle", "magenta", "square"))
LABEL_DISTANCE = 80.0  # a patch whose mean colour lies farther than this from both named colours is neither


@dataclass
class BindingProbe:
    blocks: list[str]
    right: list[float]  # per block: mean attention of a labelled image token to its own colour word
    wrong: list[float]  # ... and to the other object's colour word
    images: int
    both_colours: int  # images in which both named colours appear
    per_image: list[dict] = field(default_factory=list)
    # per block: an image token's largest logit to any text token (q.k / sqrt(d)), the mean over heads, tokens and
    # every image, early steps. Flux's query/key norms bound it (sqrt(d) times the norms' largest weights).
    peak_logit: list[float] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"binding probe: {self.both_colours} of {self.images} images show both colours; attention of an "
                "image token to its own / the other object's colour word, early steps",
                f"  {'block':<10} {'own':>7} {'other':>7} {'ratio':>6} {'peak logit':>11}"]
        peaks = self.peak_logit or [float("nan")] * len(self.blocks)
        for b, r, w, pk in zip(self.blocks, self.right, self.wrong, peaks):
            rows.append(f"  {b:<10} {r:7.3f} {w:7.3f} {r / w if w > 0 else float('nan'):6.2f} {pk:11.2f}")
        return "\n".join(rows)


def token_labels(image: np.ndarray, side: int, colours: tuple[str, str]) -> np.ndarray:
    """Per image token (``side`` x ``side`` patches, row-major as Flux packs them): 0 or 1 for the nearer of the two
    named colours, -1 where the patch's mean colour is near neither."""
    h, w, _ = image.shape
    patches = image.astype(float).reshape(side, h // side, side, w // side, 3).mean((1, 3)).reshape(-1, 3)
    ref = np.array([COLORS[c] for c in colours], float)
    d = np.linalg.norm(patches[:, None] - ref[None], axis=-1)
    return np.where(d.min(1) < LABEL_DISTANCE, d.argmin(1), -1)


class Recorded(NamedTuple):
    attention: torch.Tensor
    peak: torch.Tensor


@contextlib.contextmanager
def joint_attention_recorded(transformer):
    """Record every joint attention of ``transformer``'s passes: ``records[pass][block]`` is a :class:`Recorded`
    whose ``attention`` is the heads' mean attention of image queries to text keys (batch, image tokens, text
    tokens) and ``peak`` each image query's largest logit to a text key, the mean over heads (batch, image
    tokens)."""
    import diffusers.models.transformers.transformer_flux as flux

    records: list[list[Recorded]] = []
    text_len = {}

    def pre(_module, _args, kwargs):
        records.append([])
        text_len["n"] = kwargs["encoder_hidden_states"].shape[1]

    original = flux.dispatch_attention_fn

    def recording(query, key, value, **kw):
        n = text_len["n"]
        logits = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) / query.shape[-1] ** 0.5
        p = torch.softmax(logits, -1)
        records[-1].append(Recorded(p[:, :, n:, :n].mean(1).detach(), logits[:, :, n:, :n].amax(-1).mean(1).detach()))
        return original(query, key, value, **kw)

    handle = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    flux.dispatch_attention_fn = recording
    try:
        yield records
    finally:
        flux.dispatch_attention_fn = original
        handle.remove()


def probe_binding(model: str, seeds: int = 4, steps: int | None = None, early: float = 0.5,
                  device: str = "cpu") -> BindingProbe:
    """Run the probe on Flux pipeline ``model`` over :data:`PAIRS` x ``seeds`` images, at ``steps`` sampling steps
    (default: the model's), averaging attention over the first ``early`` share of the steps."""
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler

    pipe = load_pipeline(model, device)
    if type(pipe).__name__ != "FluxPipeline":
        raise ValueError(f"the binding probe reads Flux's joint attention; {model} is a {type(pipe).__name__}")
    sampler = pipeline_sampler(pipe, model, steps=steps)
    n_steps = sampler.options.num_inference_steps
    t = pipe.transformer
    blocks = [f"double.{i}" for i in range(len(t.transformer_blocks))] + \
             [f"single.{i}" for i in range(len(t.single_transformer_blocks))]
    words = lambda p: pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(p)["input_ids"])  # noqa: E731
    sums, count, both, per_image, peaks = np.zeros((2, len(blocks))), 0, 0, [], []
    for c1, s1, c2, s2 in PAIRS:
        prompt = f"a {c1} {s1} and a {c2} {s2}"
        toks = words(prompt)
        i1, i2 = toks.index(c1), toks.index(c2)
        for seed in range(seeds):
            with joint_attention_recorded(t) as records:
                image = sampler.generate([prompt], [seed], progress=False)[0]
            passes = records[::len(records) // n_steps]  # the conditional pass of each step (true CFG adds one)
            first = passes[:max(1, round(early * n_steps))]
            peaks.append(torch.stack([torch.stack([b.peak[0].mean() for b in p]) for p in first]).mean(0))
            side = int(round(first[0][0].attention.shape[1] ** 0.5))
            lab = torch.as_tensor(token_labels(image, side, (c1, c2)))
            if not ((lab == 0).any() and (lab == 1).any()):
                per_image.append({"prompt": prompt, "seed": seed, "both_colours": False})
                continue
            both += 1
            # steps, blocks, image tokens, text tokens
            att = torch.stack([torch.stack([b.attention for b in p]) for p in first])[:, :, 0]
            right = (att[:, :, lab == 0, i1].mean(-1) + att[:, :, lab == 1, i2].mean(-1)) / 2
            wrong = (att[:, :, lab == 0, i2].mean(-1) + att[:, :, lab == 1, i1].mean(-1)) / 2
            r, w = right.mean(0).numpy(), wrong.mean(0).numpy()
            sums += np.stack([r, w])
            count += 1
            per_image.append({"prompt": prompt, "seed": seed, "both_colours": True, "right": r.round(4).tolist(),
                              "wrong": w.round(4).tolist()})
    mean = sums / max(count, 1)
    return BindingProbe(blocks, mean[0].round(4).tolist(), mean[1].round(4).tolist(), len(PAIRS) * seeds, both,
                        per_image, [round(float(x), 3) for x in torch.stack(peaks).mean(0)] if peaks else [])
