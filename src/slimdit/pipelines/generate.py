"""``slimdit generate``: prompts in, PNGs and an enlarged grid out."""

from __future__ import annotations

from pathlib import Path

from slimdit.io import write_json
from slimdit.pipelines.loading import load_sampler
from slimdit.reports.grids import make_grid, save_images


def generate_to_dir(model: str, prompts: list[str], out_dir: str | Path, images_per_prompt: int = 4, seed: int = 0,
                    steps: int | None = None, guidance: float | None = None, scale: int = 8) -> Path:
    """Generate ``images_per_prompt`` images per prompt; write ``image_*.png``, ``grid.png``, ``prompts.json``."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty --prompt")
    if images_per_prompt < 1:
        raise ValueError(f"--num-images must be at least 1, got {images_per_prompt}")
    sampler = load_sampler(model, steps=steps, guidance=guidance)
    texts = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + k for k in range(len(texts))]
    images = sampler.generate(texts, seeds)
    out = Path(out_dir)
    save_images(images, out)
    make_grid(images, ncol=images_per_prompt, scale=scale).save(out / "grid.png")
    write_json(out / "prompts.json", [{"file": f"image_{k:04d}.png", "prompt": t, "seed": s}
                                      for k, (t, s) in enumerate(zip(texts, seeds))])
    return out
