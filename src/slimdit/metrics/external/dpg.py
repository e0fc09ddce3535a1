"""dpg-bench: DPG-Bench (Hu et al., 2024, ELLA), scored as TencentQQGYLab/ELLA ``dpg_bench/compute_dpg_bench.py``
scores it, with its mPLUG-large VQA model (through modelscope).

Protocol: the 1,065 prompts of ``dpg_bench/prompts/*.txt``, 4 images per prompt tiled 2 x 2 into one image (left
to right, top to bottom), each tile asked every question ``dpg_bench.csv`` holds for the prompt. An answer "yes"
scores 1; a question whose parent question scored 0 is zeroed; a tile's score is the mean over questions, a
prompt's the mean over its tiles, and the benchmark's 100 x the mean over prompts. Category scores are 100 x the
mean raw answer per category (L2: the tuple's head, "entity - whole"; L1: its first word, "entity").

Kept from the reference so that scores compare with published ones: it drops the CSV's first data row; a prompt
whose question depends on one it lacks fails and leaves the mean (counted in ``n_failed``); category scores use the
raw answers of the last tile only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdit.metrics.benchmarks import Benchmark, EvalResult
from slimdit.metrics.external.protocol import (
    DATA_FLAG,
    BenchPrompt,
    adapter_scorer,
    check_images_per_prompt,
    device,
    find_path,
    progress_bar,
    protocol_record,
    require_package,
    sample,
    select,
)

NAME = "dpg-bench"
PROMPTS = 1065
IMAGES_PER_PROMPT = 4  # one 2 x 2 grid
COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
VQA_MODEL = "damo/mplug_visual-question-answering_coco_large_en"
DATA_ENV = "SLIMDIT_DPG_DATA"
VQA_ENV = "SLIMDIT_DPG_VQA"
DATA_HOW = "clone https://github.com/TencentQQGYLab/ELLA and give its dpg_bench folder (prompts/ and dpg_bench.csv)"

Vqa = Callable[[Any, str], str]  # (PIL image, question) -> answer


@dataclass
class Questions:
    """One prompt's questions, by proposition id: the text, the ids it depends on (0: none), its L2 category."""

    text: dict[int, str] = field(default_factory=dict)
    parents: dict[int, list[int]] = field(default_factory=dict)
    category: dict[int, str] = field(default_factory=dict)


def read_questions(path: Path) -> dict[str, Questions]:
    """dpg_bench.csv, read as the reference's ``prepare_dpg_data`` reads it (its first data row skipped; a new run
    of an item's rows starts the item afresh)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected DPG-Bench's CSV with columns {', '.join(COLUMNS)}; "
                         f"{'no rows' if not rows else 'missing ' + ', '.join(missing)}")
    items: dict[str, Questions] = {}
    previous = None
    for k, row in enumerate(rows[1:], 3):  # the reference skips data row 0; line numbers count the header
        item = row["item_id"]
        if item != previous:
            items[item] = Questions()
        try:
            qid, parents = int(row["proposition_id"]), [int(d) for d in row["dependency"].split(",")]
        except ValueError as e:
            raise ValueError(f"{path}:{k}: proposition_id and dependency must be integers ({e})") from e
        q = items[item]
        q.text[qid], q.parents[qid] = row["question_natural_language"], parents
        q.category[qid] = row["tuple"].split("(")[0].strip()
        previous = item
    return items


def read_prompts(data: str | Path | None) -> tuple[list[BenchPrompt], dict[str, Questions]]:
    """The prompts (``key``: the file's stem, the CSV's item_id), sorted by file name, and their questions."""
    folder = find_path(data, DATA_ENV, [], "DPG-Bench's dpg_bench folder", DATA_HOW, flag=DATA_FLAG)
    if not (folder / "prompts").is_dir() or not (folder / "dpg_bench.csv").is_file():
        raise FileNotFoundError(f"{folder} lacks prompts/ or dpg_bench.csv; {DATA_HOW}")
    questions = read_questions(folder / "dpg_bench.csv")
    prompts = [BenchPrompt(f.read_text().strip(), key=f.stem) for f in sorted((folder / "prompts").glob("*.txt"))]
    unasked = [p.key for p in prompts if p.key not in questions]
    if not prompts or unasked:
        raise ValueError(f"{folder}: {'no prompts/*.txt' if not prompts else 'no questions in dpg_bench.csv for '}"
                         f"{', '.join(unasked[:5])}{' ...' if len(unasked) > 5 else ''}")
    return prompts, questions


# -- tiling and scoring ---------------------------------------------------------------------------------------

def tile(images: np.ndarray) -> np.ndarray:
    """Up to 4 images (k, H, W, 3) as one 2 x 2 grid (2H, 2W, 3): left to right, top to bottom; empty places black."""
    k, h, w, c = images.shape
    if not 1 <= k <= 4:
        raise ValueError(f"a DPG-Bench grid holds 1 to 4 images, got {k}")
    grid = np.zeros((2 * h, 2 * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        r, col = divmod(i, 2)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
    return grid


def tile_boxes(w: int, h: int, k: int) -> list[tuple[int, int, int, int]]:
    """The reference's crop boxes (left, top, right, bottom) of the first ``k`` tiles of a grid of w x h tiles."""
    return [(0, 0, w, h), (w, 0, 2 * w, h), (0, h, w, 2 * h), (w, h, 2 * w, 2 * h)][:k]


class MissingParent(KeyError):
    """A question depends on one its prompt lacks: the reference's lookup fails, and it drops the prompt."""


def zero_dependents(raw: dict[int, float], parents: dict[int, list[int]]) -> dict[int, float]:
    """Zero each question one of whose parents (0: none) scored 0, in question order and stopping at the first
    zero parent, as the reference does; a parent met before that which the prompt lacks raises MissingParent."""
    scores = dict(raw)
    for qid, ps in parents.items():
        for p in (p for p in ps if p != 0):
            if p not in scores:
                raise MissingParent(p)
            if scores[p] == 0:
                scores[qid] = 0.0
                break
    return scores


def score_grid(grid: np.ndarray, k: int, q: Questions, vqa: Vqa) -> tuple[list[float], dict[int, float]]:
    """Ask every question of each of the grid's first ``k`` tiles; return the tile scores and the last tile's raw
    answers (1 for "yes")."""
    from PIL import Image

    im = Image.fromarray(grid)
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    tile_scores, raw = [], {}
    for box in tile_boxes(w, h, k):
        crop = im.crop(box)
        raw = {qid: float(vqa(crop, text) == "yes") for qid, text in q.text.items()}
        tile_scores.append(float(np.mean(list(zero_dependents(raw, q.parents).values()))))
    return tile_scores, raw


def summarize(prompts: Sequence[BenchPrompt], results: Sequence[tuple[list[float], dict] | None],
              questions: dict[str, Questions]) -> dict:
    """100 x the mean prompt score, and 100 x the mean raw answer per L1 and L2 category, over prompts that did not
    fail."""
    scores, l2 = [], {}
    for p, res in zip(prompts, results):
        if res is not None:
            scores.append(np.mean(res[0]))
            for qid, cat in questions[p.key].category.items():
                l2.setdefault(cat, []).append(res[1][qid])
    l1: dict[str, list[float]] = {}
    for cat, v in l2.items():
        l1.setdefault(cat.split("-")[0].strip(), []).extend(v)
    failed = [p.key for p, r in zip(prompts, results) if r is None]
    return {"overall": 100 * float(np.mean(scores)) if scores else float("nan"),
            **{c: 100 * float(np.mean(v)) for c, v in l1.items()},
            "categories": {c: 100 * float(np.mean(l2[c])) for c in sorted(l2)},
            "n_failed": len(failed), **({"failed": failed} if failed else {})}


def score_prompts(prompts: Sequence[BenchPrompt], images: np.ndarray, k: int, questions: dict[str, Questions],
                  vqa: Vqa, progress: bool) -> list[tuple[list[float], dict] | None]:
    """Each prompt's (tile scores, last tile's raw answers), or None where it fails as in the reference."""
    out = []
    for i, p in enumerate(progress_bar(prompts, progress, "dpg-bench")):
        try:
            out.append(score_grid(tile(images[i * k:(i + 1) * k]), k, questions[p.key], vqa))
        except MissingParent:
            out.append(None)
    return out


def vqa_model() -> str:
    """mPLUG-large as a local directory: ``$SLIMDIT_DPG_VQA``, or where modelscope caches it."""
    bases = [Path(b).expanduser() for b in (os.environ.get("MODELSCOPE_CACHE"), "~/.cache/modelscope/hub",
                                            "~/.cache/modelscope") if b]
    found = [b / sub / VQA_MODEL for b in bases for sub in ("", "models")]
    how = (f"download it with `python -c \"from modelscope import snapshot_download; "
           f"print(snapshot_download('{VQA_MODEL}'))\"` and set ${VQA_ENV} to the folder it prints")
    return str(find_path(None, VQA_ENV, found, f"DPG-Bench's VQA model ({VQA_MODEL})", how))


def make_dpg(vqa: Vqa | None = None) -> Benchmark:
    """The ``dpg-bench`` benchmark; ``vqa(image, question) -> answer`` replaces mPLUG-large."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> tuple[list[BenchPrompt], dict[str, Questions]]:
        check_images_per_prompt(images_per_prompt, NAME, most=4)
        prompts, questions = read_prompts(data)
        if vqa is None:
            require_package("modelscope", "modelscope", NAME, extra="dpg")
            vqa_model()
        return select(prompts, limit), questions

    def run(sampler, limit: int | None = None, images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        prompts, questions = check(limit, data, images_per_prompt)
        ask = vqa or _mplug(vqa_model())
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        results = score_prompts(prompts, images, images_per_prompt, questions, ask, progress)
        correct = np.concatenate([np.asarray(r[0]) == 1.0 if r is not None else np.zeros(images_per_prompt, bool)
                                  for r in results])  # an image is correct when its tile scores 1
        metrics = {**summarize(prompts, results, questions),
                   **protocol_record(len(prompts), images_per_prompt, seed, PROMPTS, IMAGES_PER_PROMPT)}
        return EvalResult(metrics, per_image, images, correct)

    return Benchmark(run=run, check=check, images_per_prompt=IMAGES_PER_PROMPT,
                     data="DPG-Bench's dpg_bench folder (github.com/TencentQQGYLab/ELLA)", embedder=False,
                     scorer=adapter_scorer("dpg") if vqa is None else None)


def _mplug(model: str) -> Vqa:
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    pipe = pipeline(Tasks.visual_question_answering, model=model, device="gpu" if device() == "cuda" else "cpu")
    return lambda image, question: pipe({"image": image, "question": question})["text"]
