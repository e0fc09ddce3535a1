"""imagereward: the ImageReward benchmark (Xu et al., 2023), as THUDM/ImageReward ``test-benchmark.py`` runs it.

Protocol: the 100 prompts of ``benchmark/benchmark-prompts.json`` (rows ``{"id": ..., "prompt": ...}``), 10 images
per prompt; a prompt's score is the mean ImageReward-v1.0 reward of its images, the benchmark's score the mean over
prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimdit.metrics.benchmarks import Benchmark, EvalResult
from slimdit.metrics.external.protocol import (
    DATA_FLAG,
    BenchPrompt,
    Scorer,
    adapter_scorer,
    check_images_per_prompt,
    check_scores,
    device,
    find_path,
    hf_cached,
    per_prompt_means,
    progress_bar,
    protocol_record,
    require_package,
    sample,
    select,
)

NAME = "imagereward"
PROMPTS = 100
IMAGES_PER_PROMPT = 10
DATA_ENV = "SLIMDIT_IMAGEREWARD_DATA"
ROOT_ENV = "SLIMDIT_IMAGEREWARD_ROOT"
WEIGHTS = ("ImageReward.pt", "med_config.json")
FILE = "benchmark-prompts.json"
PROMPTS_FORM = "ImageReward's benchmark/benchmark-prompts.json (from github.com/THUDM/ImageReward)"


def read_prompts(data: str | Path | None) -> list[BenchPrompt]:
    path = find_path(data, DATA_ENV, [], "ImageReward benchmark prompts",
                     f"it is {PROMPTS_FORM}: clone the repository, or download that one file", flag=DATA_FLAG)
    if path.is_dir():  # the repository, or its benchmark/ folder
        found = [f for f in (path / "benchmark" / FILE, path / FILE) if f.is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither benchmark/{FILE} nor {FILE}; give {PROMPTS_FORM}")
        path = found[0]
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{\"id\": ..., \"prompt\": ...}} rows")
    return [BenchPrompt(r["prompt"], key=str(r.get("id", i))) for i, r in enumerate(rows)]


def weights_root() -> Path:
    """``$SLIMDIT_IMAGEREWARD_ROOT`` or ``~/.cache/ImageReward`` (the package's download root), holding
    ImageReward.pt and med_config.json; BLIP's tokenizer (bert-base-uncased) must be in the HF cache."""
    how = (f"download them with `huggingface-cli download THUDM/ImageReward {' '.join(WEIGHTS)} --local-dir DIR` "
           f"and set ${ROOT_ENV}=DIR (default DIR: ~/.cache/ImageReward)")
    root = find_path(None, ROOT_ENV, [Path("~/.cache/ImageReward").expanduser()], "ImageReward's weights", how)
    missing = [w for w in WEIGHTS if not (root / w).is_file()]
    if missing:
        raise FileNotFoundError(f"ImageReward's weights: {', '.join(missing)} missing from {root}; {how}")
    if hf_cached("bert-base-uncased", "vocab.txt") is None:
        raise FileNotFoundError("ImageReward's BLIP tokenizer (bert-base-uncased) is not in the Hugging Face cache; "
                                "download it with `huggingface-cli download bert-base-uncased`")
    return root


def make_imagereward(scorer: Scorer | None = None) -> Benchmark:
    """The ``imagereward`` benchmark; ``scorer(images, prompts)`` replaces ImageReward-v1.0."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> list[BenchPrompt]:
        check_images_per_prompt(images_per_prompt, NAME)
        prompts = select(read_prompts(data), limit)
        if scorer is None:
            require_package("ImageReward", "image-reward", NAME, extra="imagereward")
            weights_root()
        return prompts

    def run(sampler, limit: int | None = None, images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        prompts = check(limit, data, images_per_prompt)
        score = scorer or _image_reward(weights_root(), progress)
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        from PIL import Image

        rewards = check_scores(score([Image.fromarray(im) for im in images], [p.text for p in per_image]),
                               len(images), "ImageReward scorer")
        by_prompt = per_prompt_means(rewards, images_per_prompt)
        metrics = {"overall": float(np.mean(by_prompt)), "model": "ImageReward-v1.0",
                   **protocol_record(len(prompts), images_per_prompt, seed, PROMPTS, IMAGES_PER_PROMPT)}
        return EvalResult(metrics, per_image, images, None)

    return Benchmark(run=run, check=check, images_per_prompt=IMAGES_PER_PROMPT, data=PROMPTS_FORM, embedder=False,
                     scorer=adapter_scorer("imagereward") if scorer is None else None)


def _image_reward(root: Path, progress: bool) -> Scorer:
    import ImageReward as RM
    import torch

    model = RM.load(str(root / "ImageReward.pt"), device=device(), download_root=str(root))

    @torch.no_grad()
    def score(images: list, prompts: list[str]) -> list[float]:
        return [float(model.score(p, im)) for im, p in progress_bar(zip(images, prompts), progress, "imagereward",
                                                                    len(images))]

    return score

