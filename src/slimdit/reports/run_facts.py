"""What a run directory records about the student it made, read from files only: its plans (``plan.json`` or
``stages/*/plan.json``), ``config.yaml``, ``summary.json``, ``metrics/*.json`` (or the last stage's ``eval.json``),
``phases/*/done.json`` and a step distillation's ``rounds/*/done.json``. The model card renders these."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def mixed_scorers(metrics: list[dict]) -> str | None:
    """A warning when ``metrics`` (saved evaluations) were scored by different scorers (a rescoring stopped half
    way, say), so they do not compare; None when they agree."""
    scorers = {m.get("scored_by") for m in metrics}
    if len(scorers) < 2:
        return None
    return (f"These evaluations were scored by different scorers ({', '.join(sorted(str(s) for s in scorers))}) and "
            "do not compare; run the command that made them again to score them all as now.")


def json_or_none(path: Path) -> Any:
    """The JSON in ``path``, or None where the run has not written it."""
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Stage:
    """One compression step: its plan and record, and the teacher's name of each unit the plan names."""

    label: str | None  # "stage 0", ... for a schedule; None for a single plan
    plan: dict
    record: dict
    teacher_names: dict[str, str] = field(default_factory=dict)


@dataclass
class RunFacts:
    """What a run directory records about one student."""

    teacher: str | None = None
    config: dict | None = None
    summary: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)  # teacher / untrained / student -> metrics JSON
    phases: list[tuple[str | None, dict]] = field(default_factory=list)  # (stage label, done.json)
    rounds: list[dict] = field(default_factory=list)  # a step distillation's rounds (done.json each)

    @classmethod
    def read(cls, run: Path | None, teacher: str | None = None) -> RunFacts:
        f = cls()
        if run is None or not Path(run).is_dir():
            f.teacher = teacher
            return f
        run = Path(run)
        f.config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else None
        f.summary = json_or_none(run / "summary.json") or {}
        f.stages = _stages(run)
        plan_teacher = (json_or_none(run / "plan.json") or {}).get("teacher")
        f.teacher = teacher or (f.config or {}).get("teacher") or f.summary.get("teacher") or plan_teacher
        for name in ("teacher", "untrained", "student", "before", "after", "baseline"):  # the last three: reward
            if (m := json_or_none(run / "metrics" / f"{name}.json")) is not None:
                f.metrics[name] = m
        stage_dirs = sorted(run.glob("stages/[0-9]*"))
        if "student" not in f.metrics and stage_dirs and (m := json_or_none(stage_dirs[-1] / "eval.json")) is not None:
            f.metrics["student"] = m
        for d in stage_dirs or [run]:
            label = f"stage {int(d.name)}" if stage_dirs else None
            f.phases += [(label, json_or_none(p)) for p in sorted(d.glob("phases/*/done.json"))]
        f.rounds = [json_or_none(p) for p in sorted(run.glob("rounds/*/done.json"))]
        return f

    @property
    def block_params(self) -> tuple[int, int] | None:
        """(teacher, student) parameters in all units."""
        if not self.stages:
            return None
        return self.stages[0].record["block_params_before"], self.stages[-1].record["block_params_after"]

    @property
    def trained(self) -> bool:
        return any(d.get("steps", 0) > 0 for _, d in self.phases)


def _stages(run: Path) -> list[Stage]:
    if (run / "plan.json").exists():
        p = json_or_none(run / "plan.json")
        return [Stage(None, p["plan"], p["record"])]
    out = []
    kept: list[str] | None = None  # the teacher's names of the units the stage's student has
    for d in sorted(run.glob("stages/[0-9]*")):
        if not (d / "plan.json").exists():
            continue
        p = json_or_none(d / "plan.json")
        names = {u: _teacher_name(kept, u) for u in p["plan"]["units"]} if kept is not None else {}
        out.append(Stage(f"stage {int(d.name)}", p["plan"], p["record"], names))
        done = json_or_none(d / "done.json")
        kept = done["kept"] if done else None
    return out


def _teacher_name(kept: list[str], unit: str) -> str:
    """A schedule's plans name the units of that stage's student: the j-th kept unit of its group."""
    group, _, j = unit.partition(".")
    return [u for u in kept if u.partition(".")[0] == group][int(j)]


def run_of(student: str | Path) -> Path | None:
    """The run directory that made the student pipeline in ``student``: the folder itself (``slimdit compress``
    writes ``plan.json`` beside the pipeline) or, for a run's ``student/``, its parent."""
    d = Path(student)
    if (d / "plan.json").exists():
        return d
    if any((d.parent / f).exists() for f in ("plan.json", "stages", "summary.json")):
        return d.parent
    return None


def is_hub_id(name: str | None) -> bool:
    """Whether a run's model name is a hub id: an existing path is not; otherwise the loader's rule
    (:func:`slimdit.pipelines.loading.is_hub_id`)."""
    from slimdit.pipelines.loading import is_hub_id as read_as_hub_id

    return name is not None and not Path(name).exists() and read_as_hub_id(name)
