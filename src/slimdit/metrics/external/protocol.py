"""What the external benchmarks share: their prompts, where their data and weights are found, how their images are
drawn and what every result records about the protocol it followed.

Nothing here imports an optional package; each benchmark imports its own inside ``run``, after ``check`` has said
what is missing and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from slimdit.errors import RunError
from slimdit.metrics.benchmarks import code_scorer, image_seeds

T = TypeVar("T")
DATA_FLAG = "--benchmark-data"  # how a user gives a benchmark's data path (``data=`` in Python)


class MissingPackage(RunError):
    """An optional package that a benchmark runs on is not installed."""


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt: its text, the group its score is reported under (style, tag), the benchmark's own id for it, and
    the benchmark's record of it (GenEval's metadata row)."""

    text: str
    group: str = ""
    key: str = ""
    meta: dict | None = field(default=None, compare=False, hash=False)


# -- what is installed, and where things are --------------------------------------------------------------------

def require_package(module: str, pip_name: str, benchmark: str, extra: str | None = None) -> None:
    """Raise :class:`MissingPackage`, naming the pip package, when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        how = f"pip install {pip_name}" + (f" (or pip install 'slimdit[{extra}]')" if extra else "")
        raise MissingPackage(f"benchmark {benchmark!r} needs the Python package {pip_name!r} (module {module!r}), "
                             f"which is not installed: {how}")


def find_path(given: str | Path | None, env: str, defaults: Sequence[Path], what: str, how: str,
              flag: str | None = None) -> Path:
    """The first of ``given``, ``$env`` and the ``defaults`` that exists; else a FileNotFoundError saying how to
    get it. A path the user named (``given`` or ``$env``) must exist: it is never silently passed over."""
    named, source = (given, flag or "the argument") if given is not None else (os.environ.get(env) or None, f"${env}")
    if named is not None:
        p = Path(named).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{what}: {p} (from {source}) does not exist; {how}")
        return p
    for d in defaults:
        if d.exists():
            return d
    give = f"give it with {flag} or ${env}" if flag else f"set ${env} to it"
    looked = f"; looked in {', '.join(str(d) for d in defaults)}" if defaults else ""
    raise FileNotFoundError(f"{what} not found ({give}{looked}); {how}")


def hf_cached(repo_id: str, filename: str, repo_type: str = "model") -> Path | None:
    """The file from the Hugging Face cache, or None: looks, never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except ValueError:  # not a hub id (a path that does not exist, say)
        return None
    return Path(hit) if isinstance(hit, str) else None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- prompts --------------------------------------------------------------------------------------------------

def interleave(prompts: Sequence[BenchPrompt]) -> list[BenchPrompt]:
    """Round-robin over the groups, in order of first appearance, each group keeping its order: every prefix
    (``--limit``) covers every group, and the full list is every prompt once."""
    groups: dict[str, list[BenchPrompt]] = {}
    for p in prompts:
        groups.setdefault(p.group, []).append(p)
    longest = max((len(g) for g in groups.values()), default=0)
    return [g[i] for i in range(longest) for g in groups.values() if i < len(g)]


def select(items: Sequence[T], limit: int | None) -> list[T]:
    """The first ``limit`` items (all when None)."""
    if limit is not None and not 1 <= limit <= len(items):
        raise ValueError(f"--limit must be between 1 and {len(items)}, got {limit}")
    return list(items[:limit])


def check_images_per_prompt(n: int | None, benchmark: str, most: int | None = None) -> None:
    if n is not None and (n < 1 or (most is not None and n > most)):
        allowed = f"1 to {most}" if most is not None else "at least 1"
        raise ValueError(f"--images-per-prompt for {benchmark} must be {allowed}, got {n}")


# -- images ---------------------------------------------------------------------------------------------------

def sample(sampler, prompts: Sequence[BenchPrompt], images_per_prompt: int, seed: int,
           progress: bool = True) -> tuple[list[BenchPrompt], np.ndarray]:
    """Draw ``images_per_prompt`` images per prompt, prompt-major, with :func:`image_seeds` (so a ``--limit``
    prefix gets the same images); return the prompt of every image and the (N, H, W, 3) uint8 images."""
    per_image = [p for p in prompts for _ in range(images_per_prompt)]
    images = np.asarray(sampler.generate([p.text for p in per_image],
                                         image_seeds(len(prompts), images_per_prompt, seed), progress=progress))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(per_image) or images.shape[-1] != 3:
        raise ValueError(f"the sampler returned images of shape {images.shape} and dtype {images.dtype} for "
                         f"{len(per_image)} prompts; expected ({len(per_image)}, H, W, 3) uint8")
    return per_image, images


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def progress_bar(items: Iterable[T], progress: bool, desc: str, total: int | None = None) -> Iterable[T]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total)


def embed_all(embed: Callable[[np.ndarray], Any], images: Iterable[np.ndarray], batch_size: int, progress: bool,
              desc: str, total: int) -> np.ndarray:
    """(N, D) float64 embeddings of ``images``, embedded ``batch_size`` at a time."""
    out = [np.asarray(embed(np.stack(b)), dtype=np.float64)
           for b in progress_bar(batches(images, batch_size), progress, desc, -(-total // batch_size))]
    return np.concatenate(out)


def per_prompt_means(scores: Sequence[float], images_per_prompt: int) -> np.ndarray:
    """(P,) mean score of each prompt's images, from the prompt-major (P * k,) image scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) % images_per_prompt:
        raise ValueError(f"expected one score per image ({images_per_prompt} per prompt), got shape {s.shape}")
    return s.reshape(-1, images_per_prompt).mean(1)


def check_scores(scores: Sequence[float], n: int, scorer: str) -> list[float]:
    out = [float(s) for s in scores]
    if len(out) != n:
        raise ValueError(f"the {scorer} returned {len(out)} scores for {n} images")
    return out


def protocol_record(n_prompts: int, images_per_prompt: int, seed: int, full_prompts: int,
                    full_images_per_prompt: int) -> dict:
    """What a result says about how it was made, and whether that is the benchmark's whole protocol (only then are
    its numbers comparable with published ones)."""
    return {"n_prompts": n_prompts, "images_per_prompt": images_per_prompt, "n_images": n_prompts * images_per_prompt,
            "seed": seed, "protocol": f"{full_prompts} prompts x {full_images_per_prompt} images",
            "complete": n_prompts == full_prompts and images_per_prompt == full_images_per_prompt}


Scorer = Callable[[list, list[str]], Sequence[float]]  # (PIL images, their prompts) -> one score per image


# -- reference sets (CMMD, FID) -------------------------------------------------------------------------------

REFERENCE_FORM = ("a folder of reference images with captions: metadata.jsonl rows {\"file_name\": ..., \"text\": ...} "
                  "(the imagefolder layout `slimdit synth` writes), e.g. COCO-30k val2014 images and their captions")


def reference_rows(data: str | Path | None, env: str, benchmark: str) -> tuple[Path, list[dict]]:
    """The reference folder and its rows (each a caption and its image's file name), read and validated."""
    from slimdit.data.datasets import read_metadata

    folder = find_path(data, env, [], f"{benchmark} reference set", f"it is {REFERENCE_FORM}", flag=DATA_FLAG)
    if not folder.is_dir():
        raise ValueError(f"{benchmark} reference set {folder} is not a folder; it must be {REFERENCE_FORM}")
    return folder, read_metadata(folder)


def reference_images(folder: Path, rows: Sequence[dict], size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each reference image, read as google-research/cmmd reads images: centre crop to ``size``'s aspect, PIL
    bicubic resize to ``size`` (height, width); (H, W, 3) uint8."""
    from PIL import Image

    from slimdit.metrics.embedders import center_crop_resize

    for row in rows:
        path = folder / row["file_name"]
        try:
            with Image.open(path) as im:
                yield center_crop_resize(im, size)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder}/metadata.jsonl names {row['file_name']}, which does not exist") from e


def adapter_sources(module: str) -> tuple[str, ...]:
    """The package files whose code scores the external benchmark in ``metrics/external/{module}.py``: that adapter,
    and what every adapter shares (this protocol, the image preparation)."""
    return (f"metrics/external/{module}.py", "metrics/external/protocol.py", "metrics/benchmarks.py",
            "metrics/embedders.py")


def adapter_scorer(module: str) -> Callable[[], str]:
    """The ``scorer`` of the external benchmark in ``metrics/external/{module}.py`` scored by its official model: a
    digest of :func:`adapter_sources`' code, so that a score saved before an upgrade changed it is made again. The
    scoring weights' files (and GenEval's evaluator, in the user's checkout) are not read."""
    return code_scorer(*adapter_sources(module))
