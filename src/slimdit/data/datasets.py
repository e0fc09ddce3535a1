"""Caption-image datasets: a spec a world registers (``shapes-train:N[:SEED]``), or a folder in the
``imagefolder`` layout (images plus ``metadata.jsonl`` rows ``{"file_name": ..., "text": ...}``), as written by
``slimdit synth``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from slimdit.registry import DATASETS, is_spec, spec_forms


@dataclass
class CaptionImages:
    captions: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    source: str


def read_metadata(folder: Path) -> list[dict]:
    import os

    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"{folder} has no metadata.jsonl (rows of {{\"file_name\": ..., \"text\": ...}})")
    rows = []
    for k, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta}:{k}: not JSON ({e})") from e
        if not isinstance(row.get("file_name"), str):
            raise ValueError(f"{meta}:{k}: missing file_name")
        name = row["file_name"]
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise ValueError(f"{meta}:{k}: file_name {name!r} is outside {folder}; give a path relative to the folder "
                             "(no leading '/', no '..' that climbs out)")
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{meta}:{k}: missing caption ('text') for {row['file_name']}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{meta} lists no images")
    return rows


def image_folder(folder: str | Path, size: int | None = None) -> CaptionImages:
    """Read and check every image and caption before any training starts."""
    folder = Path(folder)
    rows = read_metadata(folder)
    imgs = []
    for row in rows:
        path = folder / row["file_name"]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                imgs.append(np.asarray(im))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder}/metadata.jsonl names {row['file_name']}, which does not exist") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"corrupt or unreadable image {path}: {e}") from e
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in size {sorted(shapes)}; set the dataset's size")
    return CaptionImages([r["text"] for r in rows], np.stack(imgs), str(folder))


def load_dataset(spec: str, size: int | None = None) -> CaptionImages:
    """A registered spec (``shapes-train:N[:SEED]``) or a folder path."""
    if is_spec(spec):
        return DATASETS[spec.partition(":")[0]](spec)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"dataset {spec!r} is neither {spec_forms()} nor an existing folder")
    return image_folder(spec, size)
