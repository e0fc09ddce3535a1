"""``slimdit generate``: prompts in, PNGs and an enlarged grid out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimdit.io import ensure_writable, write_json
from slimdit.pipelines.loading import load_sampler
from slimdit.reports.grids import make_grid, save_images


def generate_to_dir(model: str, prompts: list[str], out_dir: str | Path, images_per_prompt: int = 4, seed: int = 0,
                    steps: int | None = None, guidance: float | None = None, scale: int = 8,
                    vs: str | None = None) -> Path:
    """Generate ``images_per_prompt`` images per prompt; write ``image_*.png``, ``grid.png``, ``prompts.json``.

    With ``vs`` (another model: the teacher of a student, or ``shapes-oracle``), that model draws the same prompts
    from the same seeds into ``vs/``, and ``grid.png`` puts each prompt's row of ``model`` left of ``vs``'s."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty --prompt")
    if images_per_prompt < 1:
        raise ValueError(f"--num-images must be at least 1, got {images_per_prompt}")
    ensure_writable(out_dir, "generate --out")
    texts = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + k for k in range(len(texts))]
    samplers = [load_sampler(m, steps=steps, guidance=guidance) for m in ([model] if vs is None else [model, vs])]
    images = samplers[0].generate(texts, seeds)
    out = Path(out_dir)
    save_images(images, out)
    rows = [{"file": f"image_{k:04d}.png", "prompt": t, "seed": s} for k, (t, s) in enumerate(zip(texts, seeds))]
    if vs is None:
        make_grid(images, ncol=images_per_prompt, scale=scale).save(out / "grid.png")
    else:
        other = samplers[1].generate(texts, seeds)
        save_images(other, out / "vs")
        side = np.concatenate([images.reshape(len(prompts), images_per_prompt, *images.shape[1:]),
                               other.reshape(len(prompts), images_per_prompt, *other.shape[1:])], axis=1)
        make_grid(side.reshape(-1, *images.shape[1:]), ncol=2 * images_per_prompt, scale=scale).save(out / "grid.png")
        rows = [{**r, "vs_file": f"vs/image_{k:04d}.png", "vs_model": vs} for k, r in enumerate(rows)]
    write_json(out / "prompts.json", rows)
    return out
