"""``slimdit demo``: the main job on the embedded default.

For now it evaluates the built-in teacher ``shapes-pixart`` on shapes-geneval beside the ``shapes-oracle``
ceiling and writes a run directory with ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from slimdit.io import atomic_write_text, write_json
from slimdit.metrics.evaluate import evaluate_model
from slimdit.reports.grids import make_grid
from slimdit.reports.html import build_report

TEACHER = "shapes-pixart"


def _summary(m: dict) -> dict:
    return {"shapes_geneval_overall": m["overall"], "fid": m["fid"], "cmmd": m["cmmd"], "clip_score": m["clip_score"],
            **{k: m[k] for k in ("single_object", "two_object", "counting", "colors", "position", "color_attr")}}


def run_demo(out: str | Path, limit: int = 120, images_per_prompt: int = 4, seed: int = 0,
             steps: int | None = None, guidance: float | None = None) -> Path:
    """Evaluate the teacher and the oracle on the first ``limit`` prompts; write the run directory."""
    run = Path(out)
    if (run / "summary.json").exists():
        raise FileExistsError(f"{run} already holds a finished demo run; choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    config = {"job": "demo", "teacher": TEACHER, "benchmark": "shapes-geneval", "limit": limit,
              "images_per_prompt": images_per_prompt, "seed": seed, "steps": steps, "guidance": guidance,
              "embedder": "shapes"}
    atomic_write_text(run / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    t0 = time.time()
    common = dict(limit=limit, images_per_prompt=images_per_prompt, seed=seed)
    teacher = evaluate_model(TEACHER, out=run / "metrics" / "teacher.json", steps=steps, guidance=guidance, **common)
    oracle = evaluate_model("shapes-oracle", out=run / "metrics" / "shapes-oracle.json", **common)
    # two prompts per category, four seeds each
    rows = min(12, len(teacher.prompts) // images_per_prompt)
    k = rows * images_per_prompt
    make_grid(teacher.images[:k], ncol=images_per_prompt, scale=6, marks=teacher.correct[:k]).save(
        run / "grid_teacher.png")
    atomic_write_text(run / "grid_teacher.txt",
                      "\n".join(teacher.prompts[i].text for i in range(0, k, images_per_prompt)) + "\n")
    make_grid(oracle.images[:k], ncol=images_per_prompt, scale=6, marks=oracle.correct[:k]).save(
        run / "grid_shapes-oracle.png")
    write_json(run / "summary.json", {
        "description": f"shapes-pixart teacher on the first {limit} shapes-geneval prompts x {images_per_prompt} "
                       f"images, beside the shapes-oracle ceiling",
        "teacher": _summary(teacher.metrics),
        "oracle": _summary(oracle.metrics),
        "teacher_accuracy_images": float(np.mean(teacher.correct)),
        "elapsed_s": round(time.time() - t0, 1),
    })
    build_report(run)
    return run
