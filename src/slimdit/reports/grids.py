"""Image grids, enlarged with nearest-neighbour so that 32x32 pixels stay readable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_grid(images: np.ndarray, ncol: int, scale: int = 4, pad: int = 2,
              marks: np.ndarray | None = None) -> Image.Image:
    """Tile (N, H, W, 3) uint8 images into ``ncol`` columns; ``marks`` (N,) bool draws a green or red frame."""
    n, h, w, _ = images.shape
    nrow = -(-n // ncol)
    H, W = h * scale, w * scale
    canvas = Image.new("RGB", (ncol * (W + pad) + pad, nrow * (H + pad) + pad), (60, 60, 60))
    draw = ImageDraw.Draw(canvas)
    for k, img in enumerate(images):
        r, c = divmod(k, ncol)
        x, y = pad + c * (W + pad), pad + r * (H + pad)
        canvas.paste(Image.fromarray(img).resize((W, H), Image.NEAREST), (x, y))
        if marks is not None:
            draw.rectangle([x, y, x + W - 1, y + H - 1], outline=(40, 200, 40) if marks[k] else (220, 40, 40),
                           width=max(1, scale // 2))
    return canvas


def save_images(images: np.ndarray, out_dir: str | Path, stem: str = "image") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(images):
        p = out / f"{stem}_{k:04d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def save_eval_grid(result, path: str | Path, images_per_prompt: int, rows: int = 12) -> Path:
    """The first ``rows`` prompts of an evaluation, one row each, frames marking success; captions beside as .txt."""
    k = min(rows, len(result.prompts) // images_per_prompt) * images_per_prompt
    path = Path(path)
    marks = None if result.correct is None else result.correct[:k]  # benchmarks without a per-image verdict
    make_grid(result.images[:k], ncol=images_per_prompt, scale=6, marks=marks).save(path)
    path.with_suffix(".txt").write_text(
        "\n".join(result.prompts[i].text for i in range(0, k, images_per_prompt)) + "\n")
    return path
