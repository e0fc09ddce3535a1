"""What a run directory was made from: its config, and the contents of every input the config points to.

A rerun continues a run only when both are unchanged: ``config.yaml`` holds the config, ``inputs.json`` the
fingerprints of the teacher's files, the plan file's contents, the data folders and the calibration prompts. A
changed input under a run that has started is refused with what changed, so ``plan.json``, ``summary.json`` and
``student/`` can never describe different things. A run that failed before producing anything (say, an
infeasible schedule) is taken over by the corrected config.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from slimdit.io import read_json, write_json

RECORDS = {"config.yaml", "inputs.json"}
# keyed by their contents (cache/), checked by their own record (synth/), or redone when their settings change
# (the demo's analysis/): none of them ties a run directory to its first config
REBUILDABLE = {"cache", "synth", "analysis", "timings.json"}


def files_fingerprint(path: str | Path) -> str:
    """A short digest of a file or a folder's files: each contributes its relative path, size and first and last
    MiB (hashing multi-GB checkpoints whole would cost more than the checks save)."""
    src = Path(path)
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(q for q in src.rglob("*") if q.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(src).as_posix() if f != src else f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _spec(spec: str) -> str:
    """A data or prompt spec's identity: ``shapes-train:...`` is generated from its spec; a path by its files."""
    if spec.startswith("shapes-train:") or not Path(spec).exists():
        return spec
    return f"{spec}@{files_fingerprint(spec)}"


def input_fingerprints(cfg: BaseModel) -> dict[str, Any]:
    """The fingerprints of everything ``cfg`` (a distill, schedule or demo config) points to."""
    from slimdit.compress.plan import Plan
    from slimdit.pipelines.loading import model_fingerprint

    out: dict[str, Any] = {"teacher": model_fingerprint(cfg.teacher)}
    plan = getattr(cfg, "plan", None)
    if isinstance(plan, str):
        out["plan"] = Plan.load(plan).to_dict()
    out["data.real"] = _spec(cfg.data.real)
    synth = cfg.data.synth
    if synth is not None:  # the sets runs make are checked against their synth.json; a user's folder by its files
        from slimdit.data.synth import made_by_run

        out["data.synth"] = "made by the run (synth.json)" if made_by_run(synth) else _spec(synth)
    calibration = getattr(cfg, "calibration", None)
    if calibration is not None:
        out["calibration.prompts"] = _spec(calibration.prompts)
    return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted ``key: old -> new`` lines for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in dict.fromkeys([*old, *new])
                for line in _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _started(run: Path) -> bool:
    """Whether ``run`` holds work of its config (anything but the records and what is rebuilt when stale)."""
    return run.is_dir() and any(not p.name.startswith(".") and p.name not in RECORDS | REBUILDABLE
                                for p in run.iterdir())


def check_run_dir(run: str | Path, cfg: BaseModel, inputs: dict[str, Any]) -> None:
    """Claim ``run`` for ``cfg`` and ``inputs``: refuse a run directory whose work came from another config or
    other inputs (naming what changed), take over one that holds no work yet, and record both."""
    run = Path(run)
    config = cfg.model_dump(mode="json")
    changes = []
    if (run / "config.yaml").exists():
        changes += [f"config {line}" for line in _diff(yaml.safe_load((run / "config.yaml").read_text()), config)]
    if (run / "inputs.json").exists():
        changes += [f"input {line}" for line in _diff(read_json(run / "inputs.json"), inputs)]
    if changes and _started(run):
        raise ValueError(f"{run} holds a run made from other inputs; restore them or choose another out:\n  "
                         + "\n  ".join(changes))
    if changes:
        print(f"slimdit: {run} held no work yet; starting it with the new config", file=sys.stderr)
    from slimdit.config import dump_config

    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    write_json(run / "inputs.json", inputs)
