"""geneval: GenEval (Ghosh et al., 2023), judged by GenEval's own evaluator (djghosh13/geneval
``evaluation/evaluate_images.py``: a Mask2Former detector and a CLIP colour classifier).

Protocol: the 553 prompts of ``prompts/evaluation_metadata.jsonl``, 4 images per prompt; an image is correct when
the evaluator finds what its metadata asks for. Scores as ``evaluation/summary_scores.py`` gives them: per tag
(single_object, two_object, counting, colors, position, color_attr) the fraction of correct images, and overall the
mean over tags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimdit.errors import RunError
from slimdit.metrics.benchmarks import Benchmark, EvalResult
from slimdit.metrics.external.protocol import (
    DATA_FLAG,
    BenchPrompt,
    MissingPackage,
    adapter_scorer,
    check_images_per_prompt,
    find_path,
    interleave,
    protocol_record,
    sample,
    select,
)

NAME = "geneval"
PROMPTS = 553
IMAGES_PER_PROMPT = 4
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
METADATA = Path("prompts") / "evaluation_metadata.jsonl"
EVALUATOR = Path("evaluation") / "evaluate_images.py"
DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
DATA_ENV = "SLIMDIT_GENEVAL_DATA"
DETECTOR_ENV = "SLIMDIT_GENEVAL_DETECTOR"
PYTHON_ENV = "SLIMDIT_GENEVAL_PYTHON"
REPO_HOW = "clone https://github.com/djghosh13/geneval and give the checkout"

# (metadata rows of P prompts, their P * k images prompt-major, k) -> (P * k,) bool, one verdict per image
Judge = Callable[[list[dict], np.ndarray, int], np.ndarray]


def repo_or_metadata(data: str | Path | None) -> tuple[Path | None, Path]:
    """(the GenEval checkout or None, its evaluation_metadata.jsonl) from ``data`` / ``$SLIMDIT_GENEVAL_DATA``."""
    path = find_path(data, DATA_ENV, [], "GenEval's checkout (or its prompts/evaluation_metadata.jsonl)", REPO_HOW,
                     flag=DATA_FLAG)
    if path.is_file():
        return None, path
    if not (path / METADATA).is_file():
        raise FileNotFoundError(f"{path} has no {METADATA}; {REPO_HOW}")
    return path, path / METADATA


def read_prompts(metadata: Path) -> list[BenchPrompt]:
    """Every metadata row as a prompt (group: its tag), tags interleaved so that ``--limit`` covers all six."""
    prompts = []
    for k, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{metadata}:{k}: not JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("tag"), str):
            raise ValueError(f"{metadata}:{k}: a GenEval row needs a 'prompt' and a 'tag'")
        prompts.append(BenchPrompt(row["prompt"], group=row["tag"], key=str(len(prompts)), meta=row))
    if not prompts:
        raise ValueError(f"{metadata} holds no prompts")
    return interleave(prompts)


def summarize(per_image: Sequence[BenchPrompt], correct: np.ndarray, images_per_prompt: int) -> dict:
    """summary_scores.py: per tag (in order of first appearance) the mean correctness of its images; overall the
    mean over tags; beside them the fraction of correct images and of prompts with at least one correct image."""
    tags: dict[str, list[bool]] = {}
    for p, ok in zip(per_image, correct):
        tags.setdefault(p.group, []).append(bool(ok))
    by_tag = {t: float(np.mean(v)) for t, v in tags.items()}
    return {"overall": float(np.mean(list(by_tag.values()))), **by_tag,
            "correct_images": float(np.mean(correct)),
            "correct_prompts": float(np.asarray(correct).reshape(-1, images_per_prompt).any(1).mean())}


@dataclass(frozen=True)
class GenEvalEvaluator:
    """GenEval's evaluator run as its README runs it, in the Python that has its dependencies (mmdet 2.x,
    open_clip, clip_benchmark): images written in its layout (``NNNNN/metadata.jsonl``, ``NNNNN/samples/KKKK.png``),
    ``evaluation/evaluate_images.py`` called on them, its ``results.jsonl`` read back."""

    repo: Path
    detector_dir: Path
    python: str = sys.executable

    def __call__(self, rows: list[dict], images: np.ndarray, images_per_prompt: int) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="slimdit-geneval-") as tmp:
            folder, results = Path(tmp) / "images", Path(tmp) / "results.jsonl"
            write_layout(folder, rows, images, images_per_prompt)
            cmd = [self.python, str(self.repo / EVALUATOR), str(folder), "--outfile", str(results),
                   "--model-path", str(self.detector_dir)]
            done = subprocess.run(cmd, cwd=self.repo, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise RunError(f"GenEval's evaluator failed (exit {done.returncode}): {' | '.join(tail)}")
            return read_results(results, len(rows), images_per_prompt)


def write_layout(folder: Path, rows: Sequence[dict], images: np.ndarray, images_per_prompt: int) -> None:
    """GenEval's image layout: one folder per prompt holding its metadata row and its samples."""
    from PIL import Image

    for i, row in enumerate(rows):
        d = folder / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        for j in range(images_per_prompt):
            Image.fromarray(images[i * images_per_prompt + j]).save(d / "samples" / f"{j:04d}.png")


def read_results(path: Path, n_prompts: int, images_per_prompt: int) -> np.ndarray:
    """The evaluator's verdicts, put back in prompt-major order by each result's folder and sample number."""
    correct = np.zeros(n_prompts * images_per_prompt, dtype=bool)
    seen = np.zeros_like(correct)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            f = Path(row["filename"])
            k = int(f.parent.parent.name) * images_per_prompt + int(f.stem)
            correct[k], seen[k] = bool(row["correct"]), True
    if not seen.all():
        raise RunError(f"GenEval's evaluator judged {int(seen.sum())} of {len(seen)} images ({path})")
    return correct


def evaluator(repo: Path | None) -> GenEvalEvaluator:
    """The official evaluator, once its checkout, detector weights and Python are all there."""
    if repo is None or not (repo / EVALUATOR).is_file():
        raise FileNotFoundError(f"GenEval's evaluator needs the checkout, not only its metadata file; {REPO_HOW}")
    det = find_path(None, DETECTOR_ENV, [], "GenEval's object detector folder",
                    f"download it with `{EVALUATOR.parent}/download_models.sh DIR` from the GenEval checkout and "
                    f"set ${DETECTOR_ENV}=DIR")
    if not (det / DETECTOR).is_file():
        raise FileNotFoundError(f"{det} (${DETECTOR_ENV}) has no {DETECTOR}; run `{EVALUATOR.parent}/"
                                f"download_models.sh {det}` from the GenEval checkout")
    python = os.environ.get(PYTHON_ENV) or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import mmdet, open_clip, clip_benchmark"], capture_output=True,
                               text=True)
    except OSError as e:
        raise FileNotFoundError(f"GenEval's Python {python} (${PYTHON_ENV}) cannot run: {e.strerror or e}") from e
    if probe.returncode != 0:
        raise MissingPackage(f"GenEval's evaluator needs mmdet 2.x, open_clip and clip_benchmark in {python} (set "
                             f"${PYTHON_ENV} to a Python that has them; GenEval's README: `mim install mmdet==2.27.0`, "
                             f"pip install open-clip-torch clip-benchmark); it said: "
                             f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return GenEvalEvaluator(repo, det, python)


def make_geneval(judge: Judge | None = None) -> Benchmark:
    """The ``geneval`` benchmark; ``judge`` replaces GenEval's evaluator."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> tuple[Judge, list[BenchPrompt]]:
        check_images_per_prompt(images_per_prompt, NAME)
        repo, metadata = repo_or_metadata(data)
        prompts = select(read_prompts(metadata), limit)
        return judge or evaluator(repo), prompts

    def run(sampler, limit: int | None = None, images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        judge_, prompts = check(limit, data, images_per_prompt)
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        correct = np.asarray(judge_([p.meta for p in prompts], images, images_per_prompt), dtype=bool)
        if correct.shape != (len(images),):
            raise ValueError(f"the GenEval judge returned shape {correct.shape} for {len(images)} images")
        metrics = {**summarize(per_image, correct, images_per_prompt),
                   **protocol_record(len(prompts), images_per_prompt, seed, PROMPTS, IMAGES_PER_PROMPT)}
        return EvalResult(metrics, per_image, images, correct)

    return Benchmark(run=run, check=check, images_per_prompt=IMAGES_PER_PROMPT,
                     data="GenEval's checkout (github.com/djghosh13/geneval)", embedder=False,
                     scorer=adapter_scorer("geneval") if judge is None else None)
