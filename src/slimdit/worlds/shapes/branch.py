"""Branching a shapes training run: a new run that starts at a checkpoint of another one and changes only how the
optimisation goes on (typically a cosine anneal of a constant-rate run). Both teacher recipes use it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from slimdit.io import read_json, write_json
from slimdit.worlds.shapes.checkpoints import checkpoints

COPIED = ("vae", "vae_quality.json", "hardware.json")


def branch_run(source: str | Path, run_dir: str | Path, recipe: dict, step: int | None, *,
               config: Callable[[Path, dict | None], object], branchable: frozenset, resumable: frozenset):
    """Start run ``run_dir`` from checkpoint ``step`` (default: the last) of run ``source``, with the fields in
    ``recipe`` (``branchable`` or ``resumable`` ones only) changed from then on.

    ``config(run, fields)`` is the recipe's config: the saved one of ``run`` when ``fields`` is None, else a new
    run's with ``fields``. The autoencoder, the checkpoint and the log up to ``step`` are copied, and
    ``branch.json`` records where the run came from. An ``anneal_start`` before ``step`` is refused: it would
    rewrite what the source already trained. Nothing is written before every check passes."""
    src, run = Path(source), Path(run_dir)
    if (run / "config.json").exists():
        raise FileExistsError(f"{run} already holds a run; resume it without --from")
    cks = checkpoints(src / "checkpoints")
    ck = (cks[-1] if cks else None) if step is None else src / "checkpoints" / f"step_{step:07d}"
    if ck is None or not ck.exists():
        raise FileNotFoundError(f"no checkpoint {'' if ck is None else ck.name + ' '}under {src / 'checkpoints'}"
                                f" to branch from{'' if src.exists() else f' ({src} does not exist)'}")
    at = read_json(ck / "state.json")["step"]
    bad = sorted(set(recipe) - branchable - resumable)
    if bad:
        raise ValueError(f"a branch may not change {', '.join(bad)}; it may change {', '.join(sorted(branchable))}")
    if recipe.get("anneal_start") and recipe["anneal_start"] < at:
        raise ValueError(f"anneal_start {recipe['anneal_start']} lies before the branch point, step {at}")
    before = asdict(config(src, None))
    cfg = config(run, {**before, **recipe})
    if cfg.steps <= at:
        raise ValueError(f"the branch starts at step {at}; give it more steps (--steps), not {cfg.steps}")
    run.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src / name).is_dir():
            shutil.copytree(src / name, run / name)
        elif (src / name).exists():
            shutil.copy2(src / name, run / name)
    shutil.copytree(ck, run / "checkpoints" / ck.name)
    if (src / "metrics.jsonl").exists():
        lines = [ln for ln in (src / "metrics.jsonl").read_text().splitlines()
                 if ln.strip() and json.loads(ln)["step"] <= at]
        (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    write_json(run / "branch.json", {"source": str(src), "step": at,
                                     "changed": {k: v for k, v in recipe.items() if before[k] != v}})
    write_json(run / "config.json", asdict(cfg))
    return cfg
