"""Teacher-generated data (``slimdit synth``): images and captions in the imagefolder layout, resumable."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from slimdit.pipelines.sampling import Sampler


def read_prompts(spec: str) -> list[str]:
    """``shapes-train:N[:SEED]`` (training captions, never evaluation prompts) or a text file, one per line."""
    if spec.startswith("shapes-train:"):
        from slimdit.data.datasets import load_dataset

        return load_dataset(spec).captions
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"prompts {spec!r} is neither shapes-train:N nor an existing file")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{p} holds no prompts")
    return prompts


def synthesize(sampler: Sampler, prompts: list[str], out_dir: str | Path, seed: int = 0, chunk: int = 64) -> Path:
    """Generate one image per prompt into ``out_dir``; a rerun continues after the last finished image."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "metadata.jsonl"
    done = sum(1 for line in meta.read_text().splitlines() if line.strip()) if meta.exists() else 0
    with meta.open("a") as f, tqdm(total=len(prompts), initial=done, desc="synth", unit="img",
                                   dynamic_ncols=True) as bar:
        for start in range(done, len(prompts), chunk):
            batch = prompts[start:start + chunk]
            images = sampler.generate(batch, [seed + start + k for k in range(len(batch))], progress=False)
            for k, (text, img) in enumerate(zip(batch, images)):
                name = f"{start + k:06d}.png"
                Image.fromarray(img).save(out / name)  # the image exists before its row
                f.write(json.dumps({"file_name": name, "text": text, "seed": seed + start + k}) + "\n")
            f.flush()
            bar.update(len(batch))
    return out
