"""What a run directory was made from: its config, and the contents of every input the config points to.

A rerun continues a run only when both are unchanged: ``config.yaml`` holds the config, ``inputs.json`` the
contents of what its input fields name (the teacher's files, the plan, the data folders, the calibration prompts),
by fingerprint. Input fields are compared by contents, not by how their paths are spelled. A changed input under
a run that has done work is refused with what changed, so ``plan.json``, ``summary.json`` and ``student/`` can
never describe different things. A run that failed before doing any work (say, an infeasible schedule) is taken
over by the corrected config.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from slimdit.config import INPUT_PATHS, dump_config
from slimdit.io import ensure_writable, files_fingerprint, read_json, write_json
from slimdit.registry import is_spec

# fields that may change under a run without changing what it makes: how many bad steps may be skipped from here on,
# whether the memory plan is checked, where a step run looks for teacher pairs made the same way (their record is
# checked, so reused pairs are the ones it would make)
FREE_FIELDS = ("train.max_skipped_steps", "memory_plan", "pairs_from")
# inputs recorded since runs began: a record saved without one was written before it was recorded and is taken as
# matching it (the record then gains it, and from there on a change is refused)
ADDED_INPUTS = ("baseline",)
# what a run's work leaves; a directory with none of it (only records, caches, a plan or a selection that the next
# attempt writes again) has done no work
WORK = ("**/checkpoints/step_*", "**/done.json", "student", "untrained", "summary.json", "metrics", "bench.json")


def spec_contents(spec: str | None) -> str | None:
    """A data or prompt spec's identity: a registered spec (``shapes-train:...``) is generated from its spec, a path
    is its files."""
    if spec is None or is_spec(spec) or not Path(spec).exists():
        return spec
    return f"files {files_fingerprint(spec)}"


def input_fingerprints(cfg: BaseModel) -> dict[str, Any]:
    """The contents of everything ``cfg`` (a distill, schedule or demo config) points to, one entry per input
    field."""
    from slimdit.compress.plan import Plan
    from slimdit.data.synth import made_by_run
    from slimdit.pipelines.loading import model_fingerprint

    out: dict[str, Any] = {"teacher": model_fingerprint(cfg.teacher)}
    student = getattr(cfg, "student", None)  # a few-step run's starting model, when not the teacher
    if isinstance(student, str):
        out["student"] = model_fingerprint(student)
    plan = getattr(cfg, "plan", None)
    if plan is not None:
        out["plan"] = (Plan.load(plan) if isinstance(plan, str) else Plan.from_dict(plan)).to_dict()
    out["data.real"] = spec_contents(cfg.data.real)
    synth = cfg.data.synth  # the sets runs make are checked against their synth.json; a user's folder by its files
    out["data.synth"] = None if synth is None else "made by the run" if made_by_run(synth) else spec_contents(synth)
    calibration = getattr(cfg, "calibration", None)
    if calibration is not None:
        out["calibration.prompts"] = spec_contents(calibration.prompts)
    baseline = getattr(cfg, "baseline", None)  # a reward run's model evaluated beside it: its metrics are kept
    if isinstance(baseline, str):
        out["baseline"] = model_fingerprint(baseline)
    return out


HUB_COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub commit, as a cache's snapshot folder and a fingerprint name it
_HUB_REVISION = re.compile(rf"@{HUB_COMMIT.pattern}$")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _same_part(old: str, new: str) -> bool:
    return old == new or (_HUB_ID.fullmatch(old) is not None and _HUB_REVISION.search(new) is not None
                          and _HUB_REVISION.sub("", new) == old)


def same_value(old: Any, new: Any) -> bool:
    """Whether a recorded value matches today's: equal, or a model fingerprint whose hub ids were recorded bare and
    now carry their cached revision (``owner/name`` then, ``owner/name@<commit>`` now;
    :func:`slimdit.pipelines.loading.model_fingerprint`), part by part for a ``pipeline+transformer`` pair. A bare id
    was recorded before revisions were, or before its download; it is taken as matching whatever revision is cached,
    and the record that gains the revision sees the next one. A recorded revision the cache no longer holds (the
    fingerprint bare again) is a change."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    olds, news = old.split("+"), new.split("+")
    return len(olds) == len(news) and all(_same_part(a, b) for a, b in zip(olds, news))


def without_revisions(value: Any) -> Any:
    """``value`` (nested dicts and lists) with hub revisions dropped from its model fingerprints: for the digests of
    records that must read the same before and after a hub id gained its revision (a stage's selection, GRASP's
    factors, the demo's analysis). The revision itself is guarded by :func:`check_run_dir`."""
    if isinstance(value, dict):
        return {k: without_revisions(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_revisions(v) for v in value]
    if isinstance(value, str) and "@" in value:
        return "+".join(_HUB_REVISION.sub("", part) for part in value.split("+"))
    return value


def recorded_commit(fingerprint: str | None, repo: str) -> str | None:
    """The commit of hub repo ``repo`` that a recorded model fingerprint names as its pipeline
    (``repo@<commit>[+transformer]``), or None (recorded bare, or another model)."""
    first = (fingerprint or "").split("+")[0]
    old, _, commit = first.rpartition("@")
    return commit if old == repo and HUB_COMMIT.fullmatch(commit) else None


def _bare_hub_ids(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_bare_hub_ids(v) for v in value.values())
    return isinstance(value, str) and any(_HUB_ID.fullmatch(part) for part in value.split("+"))


def record_revisions(run: str | Path, cfg: BaseModel, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` once the run's models are loaded: a hub id fingerprinted before its download (bare) names the
    commit that loaded, and ``run``'s record gains it before any work is saved, so a later revision is seen. Returns
    the inputs to record from here on (a teacher-pair record, say)."""
    if not _bare_hub_ids(inputs):
        return inputs
    now = input_fingerprints(cfg)
    if now == inputs or changed_fields(inputs, now):  # nothing gained, or a change the next attempt will name
        return inputs
    write_json(Path(run) / "inputs.json", now)
    return now


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted ``key: old -> new`` lines for every leaf where two nested dicts differ (:func:`same_value`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in dict.fromkeys([*old, *new])
                for line in changed_fields(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if same_value(old, new) else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _as_now(cfg: BaseModel, saved: dict, ignored: tuple[str, ...]) -> dict:
    """A saved config read by today's schema, as a config file is (its class's section defaults included), so that
    a field added since it was saved counts as its default, not as a change; unless the class's ``absent_means(saved)``
    names it (what a saved run without the field did, where that is not today's default). The ``ignored``
    fields (compared elsewhere, or free) are today's, so that a moved input cannot stop the reading; where today's
    schema refuses the saved config, it is compared as saved (its differences then name themselves)."""
    from slimdit.config import with_section_defaults

    merged = yaml.safe_load(yaml.safe_dump(saved))
    absent = getattr(type(cfg), "absent_means", None)
    if isinstance(merged, dict) and absent is not None:  # fields added with a default other than what it did
        for key, then in absent(merged).items():
            merged.setdefault(key, then)
    now = cfg.model_dump(mode="json")
    for key in ignored:
        *path, leaf = key.split(".")
        src, dst = now, merged
        for part in path:  # a section today's config has: create it where the saved one lacks it
            src = src.get(part) if isinstance(src, dict) else None
            dst = dst.setdefault(part, {}) if isinstance(dst, dict) and isinstance(src, dict) else None
        if isinstance(src, dict) and isinstance(dst, dict) and leaf in src:
            dst[leaf] = src[leaf]
    try:
        return type(cfg).model_validate(with_section_defaults(type(cfg), merged)).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - any refusal: compare the saved dict as it is
        return saved


def without_fields(config: dict, fields: tuple[str, ...]) -> dict:
    """``config`` less the dotted ``fields`` (input paths are compared by contents in ``inputs.json``)."""
    out = yaml.safe_load(yaml.safe_dump(config))
    for key in fields:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_changes(run: str | Path, cfg: BaseModel) -> list[str]:
    """The fields where ``cfg`` differs from the config ``run`` saved (``key: old -> new``; none saved: none), its
    inputs and free fields aside (:func:`check_run_dir` compares those)."""
    run = Path(run)
    if not (run / "config.yaml").exists():
        return []
    ignored = ("teacher", *INPUT_PATHS, *FREE_FIELDS)
    old = without_fields(_as_now(cfg, yaml.safe_load((run / "config.yaml").read_text()), ignored), ignored)
    return changed_fields(old, without_fields(cfg.model_dump(mode="json"), ignored))


def started(run: str | Path) -> bool:
    """Whether ``run`` holds work: a checkpoint, a finished phase or stage, a student, an evaluation (a missing
    directory holds none)."""
    return any(next(Path(run).glob(pattern), None) is not None for pattern in WORK)


def _uncached_revisions(saved: dict, now: dict) -> list[str]:
    """A hint for each hub commit a run recorded where the local cache now resolves nothing (today's fingerprint is
    the bare id: a cache cleared, or another one read)."""
    out = []
    for key, value in saved.items():
        if isinstance(value, str) and isinstance(now.get(key), str):
            for old, new in zip(value.split("+"), now[key].split("+")):
                if commit := recorded_commit(old, new):
                    out.append(f"(input {key}: the cache slimdit reads (HF_HUB_CACHE) has no {new} as `main` at "
                               f"{commit}: point it at the cache the run was made with)")
    return out


def check_run_dir(run: str | Path, cfg: BaseModel, inputs: dict[str, Any]) -> None:
    """Claim ``run`` for ``cfg`` and ``inputs``: refuse a run directory whose work came from another config or
    other inputs (naming what changed), take over one that holds no work yet, and record both."""
    run = Path(run)
    changes, saved = [f"config {line}" for line in config_changes(run, cfg)], {}
    if (run / "inputs.json").exists():
        saved = read_json(run / "inputs.json")
        now = {k: v for k, v in inputs.items() if k in saved or k not in ADDED_INPUTS}
        changes += [f"input {line}" for line in changed_fields(saved, now)]
    if changes and started(run):
        raise ValueError(f"{run} holds a run made from other inputs; restore them or choose another out:\n  "
                         + "\n  ".join(changes + _uncached_revisions(saved, inputs)))
    if changes:
        print(f"slimdit: {run} held no work yet; starting it with the new config", file=sys.stderr)
    ensure_writable(run, "out:")
    shared = getattr(getattr(cfg, "eval", None), "shared", None)
    if shared is not None:
        ensure_writable(shared, "eval.shared")
    dump_config(cfg, run / "config.yaml")
    write_json(run / "inputs.json", inputs)
