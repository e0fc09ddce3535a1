"""What every benchmark shares: its result record, its image seeds, and the contract worlds register it under.

A benchmark is ``run(sampler, limit=None, images_per_prompt=4, seed=0, embedder="shapes", progress=True)``
returning an :class:`EvalResult`, plus ``check(limit)``, which refuses bad arguments before any model is loaded.
Benchmarks that read data (the core's adapters to external benchmarks, :mod:`slimdit.metrics.external`,
registered when :mod:`slimdit.metrics` is first imported) take ``data=`` in both, ``check`` also
``images_per_prompt=``; they bring their own models and take no embedder. A benchmark may name its ``scorer`` (a
digest of the code and weights that score); its results then carry it as ``scored_by``, and a saved result scored
otherwise is made again, never reused (:func:`slimdit.metrics.evaluate.saved_metrics`).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from slimdit.registry import BENCHMARKS

__all__ = ["BENCHMARKS", "Benchmark", "EvalResult", "code_digest", "code_scorer", "image_seeds"]


@dataclass
class EvalResult:
    metrics: dict
    prompts: list[Any]  # one per image; each has a ``text``
    images: np.ndarray  # (N, H, W, 3) uint8
    correct: np.ndarray | None  # (N,) bool; None where a benchmark scores without pass/fail (HPSv2, FID, ...)


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: call it like ``run``; ``check(limit)`` validates arguments without sampling."""

    run: Callable[..., EvalResult]
    check: Callable[..., object]
    images_per_prompt: int = 4  # the protocol's number, used when the caller gives none
    data: str | None = None  # what its ``data=`` path is (prompts, a reference set); None: it takes no data
    embedder: bool = True  # whether ``run`` takes an ``embedder=``
    scorer: Callable[[], str] | None = None  # a digest of what scores (its code and weights); None: not recorded

    def __call__(self, sampler, **kwargs) -> EvalResult:
        result = self.run(sampler, **kwargs)
        if self.scorer is not None:  # saved with the metrics: a score made by another scorer is never reused
            result.metrics["scored_by"] = self.scorer()
        return result


def image_seeds(n_prompts: int, images_per_prompt: int, seed: int) -> list[int]:
    """Seed of image j of prompt i; independent of --limit, so a prefix of prompts gets the same images."""
    return [seed * 1_000_003 + i * images_per_prompt + j for i in range(n_prompts) for j in range(images_per_prompt)]


def source_code(path) -> bytes:
    """A source file's code without its comments and docstrings (its syntax tree), so that prose edits, and line
    endings, leave a digest alone; another file's bytes, line endings read as ``\\n``."""
    text = Path(path).read_bytes()
    if Path(path).suffix != ".py":
        return text.replace(b"\r\n", b"\n")
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def code_digest(root, names, extra: str = "") -> str:
    """A short digest (16 hex digits of a sha256) of the code of the files ``names`` (paths under ``root``, the
    package's folder, as :func:`source_code` reads them) and of ``extra``."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + source_code(Path(root) / name))
    h.update(extra.encode())
    return h.hexdigest()[:16]


def code_scorer(*names: str) -> Callable[[], str]:
    """A benchmark's ``scorer`` for one whose scoring is slimdit's code alone (its weights named in that code): a
    short digest of the package files ``names`` (relative to the ``slimdit`` folder), made once per process."""

    @lru_cache(maxsize=1)
    def scorer() -> str:
        from importlib import resources

        return code_digest(resources.files("slimdit"), names)

    return scorer
