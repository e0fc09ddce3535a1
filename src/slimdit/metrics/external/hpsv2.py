"""hpsv2: the HPSv2 benchmark (Wu et al., 2023) scored by HPS v2.1, as tgxs002/HPSv2 ``evaluation.py`` scores it.

Protocol: 4 styles (anime, concept-art, paintings, photo) of 800 prompts each, one image per prompt. An image's
score is the cosine of HPS's image and text features; a style's score is the mean, over its ten consecutive
80-prompt chunks, of 100 x the chunk's mean score (its spread, the std of those chunk means, is reported beside it);
the headline is the mean over the 4 styles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slimdit.metrics.benchmarks import Benchmark, EvalResult
from slimdit.metrics.external.protocol import (
    DATA_FLAG,
    BenchPrompt,
    Scorer,
    adapter_scorer,
    batches,
    check_images_per_prompt,
    check_scores,
    device,
    find_path,
    hf_cached,
    interleave,
    per_prompt_means,
    progress_bar,
    protocol_record,
    require_package,
    sample,
    select,
)

NAME = "hpsv2"
STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPTS_PER_STYLE = 800
CHUNK = 80  # evaluation.py scores each style in ten chunks of 80 prompts
VERSION = "v2.1"
CHECKPOINT = "HPS_v2.1_compressed.pt"
DATA_ENV = "SLIMDIT_HPSV2_DATA"
CHECKPOINT_ENV = "SLIMDIT_HPSV2_CHECKPOINT"
PROMPTS_HOW = ("download them with `huggingface-cli download zhwang/HPDv2 --repo-type dataset "
               + " ".join(f"benchmark/{s}.json" for s in STYLES)
               + "` (they then load from the Hugging Face cache), or give a folder holding the four files")


def hps_root() -> Path:
    """Where the hpsv2 package keeps its files: ``$HPS_ROOT`` or ``~/.cache/hpsv2``."""
    return Path(os.environ.get("HPS_ROOT") or "~/.cache/hpsv2").expanduser()


def style_files(data: str | Path | None) -> dict[str, Path]:
    """The four prompt files: from ``data`` / ``$SLIMDIT_HPSV2_DATA``, the hpsv2 package's folder, or the HF cache."""
    what = f"HPSv2 benchmark prompts ({', '.join(s + '.json' for s in STYLES)})"
    if data is not None or os.environ.get(DATA_ENV):
        folder = find_path(data, DATA_ENV, [], what, PROMPTS_HOW, flag=DATA_FLAG)
        files = {s: folder / f"{s}.json" for s in STYLES}
    else:
        local = hps_root() / "datasets" / "benchmark"
        files = {s: local / f"{s}.json" if (local / f"{s}.json").exists()
                 else hf_cached("zhwang/HPDv2", f"benchmark/{s}.json", repo_type="dataset") for s in STYLES}
    missing = [s for s, f in files.items() if f is None or not f.exists()]
    if missing:
        raise FileNotFoundError(f"{what}: {', '.join(m + '.json' for m in missing)} not found (give their folder "
                                f"with {DATA_FLAG} or ${DATA_ENV}); {PROMPTS_HOW}")
    return files


def read_prompts(data: str | Path | None) -> list[BenchPrompt]:
    """Every prompt, styles interleaved (so ``--limit`` takes the first prompts of every style); ``key`` is the
    prompt's index in its style, which fixes its 80-prompt chunk."""
    prompts = []
    for style, path in style_files(data).items():
        texts = json.loads(path.read_text())
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: expected a JSON list of prompt strings")
        prompts += [BenchPrompt(t, group=style, key=str(i)) for i, t in enumerate(texts)]
    return interleave(prompts)


def checkpoint() -> Path:
    """``$SLIMDIT_HPSV2_CHECKPOINT``, the hpsv2 package's folder, or the HF cache (xswu/HPSv2)."""
    cached = hf_cached("xswu/HPSv2", CHECKPOINT)
    return find_path(None, CHECKPOINT_ENV, [hps_root() / CHECKPOINT, *([cached] if cached else [])],
                     f"the HPS {VERSION} checkpoint ({CHECKPOINT})",
                     f"download it with `huggingface-cli download xswu/HPSv2 {CHECKPOINT}`, or set "
                     f"${CHECKPOINT_ENV} to the file")


def summarize(prompts: Sequence[BenchPrompt], prompt_scores: Sequence[float]) -> dict:
    """Per style: the mean of 100 x each 80-prompt chunk's mean (chunks by the prompt's index in its style), and
    the std of those chunk means; overall: the mean over styles."""
    chunks: dict[str, dict[int, list[float]]] = {}
    for p, s in zip(prompts, prompt_scores):
        chunks.setdefault(p.group, {}).setdefault(int(p.key) // CHUNK, []).append(float(s))
    out: dict = {}
    for style in [s for s in STYLES if s in chunks] + [s for s in chunks if s not in STYLES]:
        means = [100 * np.mean(v) for _, v in sorted(chunks[style].items())]
        out[style], out[f"{style}_std"] = float(np.mean(means)), float(np.std(means))
    return {"overall": float(np.mean([out[s] for s in chunks])), **out}


def make_hpsv2(scorer: Scorer | None = None) -> Benchmark:
    """The ``hpsv2`` benchmark; ``scorer(images, prompts)`` replaces HPS v2.1."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> list[BenchPrompt]:
        check_images_per_prompt(images_per_prompt, NAME)
        prompts = select(read_prompts(data), limit)
        if scorer is None:
            require_package("hpsv2", "hpsv2", NAME, extra="hpsv2")
            checkpoint()
        return prompts

    def run(sampler, limit: int | None = None, images_per_prompt: int = 1, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        prompts = check(limit, data, images_per_prompt)
        score = scorer or _hps(checkpoint(), progress=progress)
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        from PIL import Image

        scores = check_scores(score([Image.fromarray(im) for im in images], [p.text for p in per_image]),
                              len(images), "HPSv2 scorer")
        metrics = {**summarize(prompts, per_prompt_means(scores, images_per_prompt)), "hps_version": VERSION,
                   **protocol_record(len(prompts), images_per_prompt, seed, len(STYLES) * PROMPTS_PER_STYLE, 1)}
        return EvalResult(metrics, per_image, images, None)

    return Benchmark(run=run, check=check, images_per_prompt=1,
                     data="a folder holding HPSv2's anime.json, concept-art.json, paintings.json, photo.json",
                     embedder=False, scorer=adapter_scorer("hpsv2") if scorer is None else None)


def _hps(ckpt: Path, batch_size: int = 20, progress: bool = True) -> Scorer:
    """HPS v2.1 as the hpsv2 package builds it (open_clip ViT-H-14), its checkpoint loaded once."""
    import torch
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

    dev = device()
    # pretrained=None: the checkpoint holds every weight, so the LAION base need not be downloaded first
    model, _, preprocess = create_model_and_transforms(
        "ViT-H-14", None, precision="amp", device=dev, jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False)
    # the checkpoint is a pickled dict ({"state_dict": ...}), loaded as hpsv2 itself loads it
    model.load_state_dict(torch.load(ckpt, map_location=dev, weights_only=False)["state_dict"])
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def score(images: list, prompts: list[str]) -> list[float]:
        out: list[float] = []
        for idx in progress_bar(batches(range(len(images)), batch_size), progress, "hpsv2",
                                -(-len(images) // batch_size)):
            x = torch.stack([preprocess(images[i]) for i in idx]).to(dev)
            t = tokenizer([prompts[i] for i in idx]).to(dev)
            with torch.autocast(device_type="cuda", enabled=dev == "cuda"):
                o = model(x, t)
                out += (o["image_features"] * o["text_features"]).sum(-1).float().cpu().tolist()
        return out

    return score
