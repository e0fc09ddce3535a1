"""``slimdit run CONFIG``: a schedule as a resumable sequence of stages in one run directory (thesis 4.6).

Each stage scores the current student's units, selects and compresses some (a plan, in the student's unit
names), retrains with the protocol, evaluates, and writes ``stages/NN/`` (``selection.json``, ``plan.json``,
``phases/``, ``student/``, ``metrics.json``, ``done.json``). A rerun loads finished stages and continues.

- ``one_shot``: rank units once by metric importance, modify the least important until the target size.
- ``progressive``: per stage, re-rank the unmodified units and add them, least important first, until the
  calibration CMMD exceeds the threshold, then retrain; each stage removes at least its share of what is left,
  so the last stage ends at the target.
- ``linear_progressive``: per stage, score units by CMMD per removed parameter (eq. 4.15) and compress the k
  least important with linearly falling ratios (eq. 4.16-4.21); units may be compressed again later.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimdit.compress.plan import Plan, UnitOp, apply_plan
from slimdit.config import RunConfig, load_config
from slimdit.data.datasets import load_dataset
from slimdit.data.synth import check_user_set, read_prompts
from slimdit.distill.fidelity import teacher_validator
from slimdit.distill.protocols import resolve_protocol
from slimdit.distill.run import Conditionings, train_protocol
from slimdit.identity import check_run_dir, input_fingerprints, record_revisions
from slimdit.importance.metric import Calibration, metric_importance, plan_metrics, unit_op
from slimdit.io import read_json, write_json
from slimdit.metrics.embedders import get_embedder
from slimdit.metrics.evaluate import saved_metrics
from slimdit.models import adapter_for
from slimdit.models.precision import DTYPES, cast_io, frozen_dtype, student_copy
from slimdit.models.storage import load_model, save_model
from slimdit.pipelines.loading import load_pipeline, pipeline_sampler, save_student
from slimdit.pipelines.placement import frozen_components, parked
from slimdit.schedules.linear_progressive import auto_units, cmmd_per_removed_parameter, feasible_range, linear_ratios


class _Stage:
    """What a stage needs: the adapter, the teacher, a sampler over the student, the calibration set."""

    def __init__(self, cfg: RunConfig, pipe, student, calib: Calibration, embedder):
        self.cfg, self.pipe, self.calib, self.embedder = cfg, pipe, calib, embedder
        self.adapter = adapter_for(student)
        self.student = student
        self.sampler = pipeline_sampler(pipe, cfg.teacher, cfg.calibration.steps, name="student")

    def metrics(self, plan: Plan) -> dict[str, float]:
        original = self.pipe.transformer
        self.pipe.transformer = self.student
        try:
            return plan_metrics(self.adapter, self.sampler, self.embedder, self.calib, plan)
        finally:
            self.pipe.transformer = original

    def importance(self, op: str | float, units: list[str]) -> dict:
        original = self.pipe.transformer
        self.pipe.transformer = self.student
        try:
            return metric_importance(self.adapter, self.sampler, self.embedder, self.calib, op, units)
        finally:
            self.pipe.transformer = original


def _op(cfg: RunConfig, ratio: float | None = None) -> str | float:
    return "remove" if cfg.schedule.op == "remove" else (ratio if ratio is not None else cfg.schedule.svd_ratio)


def _params_after(adapter, model, unit: str, op: str | float) -> int:
    """A unit's parameter count after ``op`` (remove, or SVD at ratio c on every part), without applying it."""
    from slimdit.compress.lowrank import LowRankLinear, layer_shape
    from slimdit.compress.plan import rank_for

    if op == "remove":
        return 0
    total = adapter.unit_params(model, unit)
    for part in adapter.parts(model, unit):
        for layer in adapter.layers(model, unit, part).values():
            n, m = layer_shape(layer)
            now = layer.rank * (n + m) if isinstance(layer, LowRankLinear) else n * m
            total -= max(0, now - rank_for(layer, float(op)) * (n + m))
    return total


def _select_one_shot(st: _Stage, target_params: float) -> tuple[Plan, dict]:
    cfg = st.cfg
    a, m = st.adapter, st.student
    scores = st.importance(_op(cfg), a.units(m))
    order = sorted(scores, key=lambda u: scores[u]["rank"])
    ops, params = [], a.block_params(m)
    for u in order:
        if params <= target_params:
            break
        params -= a.unit_params(m, u) - _params_after(a, m, u, _op(cfg))
        ops.append(unit_op(u, _op(cfg)))
    if params > target_params:
        raise ValueError(f"schedule.target {cfg.schedule.target} is out of reach: modifying every unit with "
                         f"{cfg.schedule.op} leaves {params:,.0f} block parameters; raise svd_ratio or the target")
    return Plan(ops), {"scores": scores, "order": order}


def _select_progressive(st: _Stage, target_params: float, modified: set[str], stages_left: int
                        ) -> tuple[Plan, dict]:
    """Add units, least important first, until the calibration CMMD exceeds the threshold (thesis' trigger) or
    the target is reached; but always at least this stage's share of what is left to remove
    (``(params - target) / stages_left``), so that the schedule reaches its target in its stages."""
    cfg = st.cfg
    a, m = st.adapter, st.student
    candidates = [u for u in a.units(m) if u not in modified]
    if not candidates:
        raise ValueError("progressive schedule: every unit is already modified; lower stages or raise the target")
    scores = st.importance(_op(cfg), candidates)
    order = sorted(candidates, key=lambda u: scores[u]["rank"])
    chosen: list[UnitOp] = []
    params = a.block_params(m)
    pace = params - (params - target_params) / stages_left  # remove at least down to here this stage
    trace = []
    for u in order:
        trial = Plan([*chosen, unit_op(u, _op(cfg))])
        c = st.metrics(trial)["cmmd"]
        trace.append({"unit": u, "cmmd": c})
        if chosen and c > cfg.schedule.cmmd_threshold and params <= pace:
            break
        chosen = trial.ops
        params -= a.unit_params(m, u) - _params_after(a, m, u, _op(cfg))
        if params <= target_params:
            break
    return Plan(chosen), {"scores": scores, "order": order, "trace": trace, "pace_params": pace}


def _select_linear(st: _Stage, n_remove: float) -> tuple[Plan, dict]:
    s = st.cfg.schedule
    a, m = st.adapter, st.student
    units = a.units(m)
    cmmds = {u: st.metrics(Plan([unit_op(u, s.c_fixed)]))["cmmd"] for u in units}
    params = {u: a.unit_params(m, u) for u in units}
    scores = cmmd_per_removed_parameter(cmmds, params, s.c_fixed)
    auto = s.units_per_stage == "auto"
    # eq. 4.17 counts P_i c_i, but norms, biases and modulation tables are not factorised and ranks are integers:
    # raise the N given to eq. 4.19 until the parameters actually removed reach the stage's share
    asked = n_remove
    for _ in range(8):
        k = auto_units(scores, params, asked, s.base_ratio) if auto else min(s.units_per_stage, len(units))
        if k is None:
            raise _infeasible_auto(s, scores, params, n_remove, asked)
        try:
            r = linear_ratios(scores, params, asked, k, s.base_ratio)
        except ValueError:
            if auto:
                raise _infeasible_auto(s, scores, params, n_remove, asked) from None
            raise _infeasible(s, scores, params, k, n_remove, adjusted=asked != n_remove) from None
        removed = sum(params[u] - _params_after(a, m, u, c) for u, c in zip(r.units, r.ratios) if c > 0)
        if removed >= n_remove:
            break
        asked += (n_remove - removed) * 1.05
    ops = [UnitOp(u, "svd", {"*": round(c, 6)}) for u, c in zip(r.units, r.ratios) if c > 0]
    return Plan(ops), {"cmmd": cmmds, "score": scores, "ratios": dict(zip(r.units, r.ratios)), "slope": r.slope,
                       "n_remove": n_remove, "n_remove_eq_4_19": asked, "removed": removed}


def _infeasible_auto(s, scores: dict[str, float], params: dict[str, int], n_remove: float,
                     asked: float) -> ValueError:
    """``units_per_stage: auto`` found no number of units for which eq. 4.21 holds: say which way to go."""
    order = sorted(scores, key=scores.get)
    ranges = [feasible_range([params[u] for u in order[:k]], s.base_ratio) for k in range(1, len(order) + 1)]
    least, most = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)
    share = (f"{n_remove:,.0f} block parameters" + (f" ({asked:,.0f} once integer ranks and the parameters SVD does "
             "not factorise are counted)" if asked != n_remove else "")
             + f" (its share of the way to schedule.target = {s.target})")
    if asked < least:
        return ValueError(f"schedule: this stage must remove {share}, but at schedule.base_ratio = {s.base_ratio} "
                          f"any number of units removes at least {least:,.0f} (eq. 4.21: the least important unit, "
                          f"{order[0]}, takes the base ratio); lower schedule.base_ratio, use fewer schedule.stages, "
                          "or lower schedule.target")
    return ValueError(f"schedule: this stage must remove {share}, but at schedule.base_ratio = {s.base_ratio} all "
                      f"units together remove at most {most:,.0f} by P_i c_i (eq. 4.21); raise schedule.base_ratio, "
                      "use more schedule.stages, or raise schedule.target")


def _infeasible(s, scores: dict[str, float], params: dict[str, int], k: int, n_remove: float,
                adjusted: bool) -> ValueError:
    """Eq. 4.21 fails: say which schedule fields to change, quoting the N the config asks for."""
    lo, hi = feasible_range([params[u] for u in sorted(scores, key=scores.get)[:k]], s.base_ratio)
    n_units = f"{k} units" if k == s.units_per_stage else f"{k} units (all there are)"
    fields = f"schedule.units_per_stage = {s.units_per_stage}: {n_units} at schedule.base_ratio = {s.base_ratio}"
    if n_remove < lo:
        return ValueError(f"schedule: this stage must remove {n_remove:,.0f} block parameters (its share of the way "
                          f"to schedule.target = {s.target}), but {fields} remove at least {lo:,.0f} (eq. 4.21); "
                          "lower schedule.base_ratio or schedule.units_per_stage (auto picks a number that fits), "
                          "or use fewer schedule.stages")
    why = (" once integer ranks and the parameters SVD does not factorise (norms, biases, modulation) are counted"
           if adjusted else "")
    return ValueError(f"schedule: this stage must remove {n_remove:,.0f} block parameters (its share of the way to "
                      f"schedule.target = {s.target}), but {fields} cannot remove that many{why} (eq. 4.21 allows "
                      f"at most {hi:,.0f} by P_i c_i); raise schedule.base_ratio or schedule.units_per_stage "
                      "(auto picks a number that fits), use more schedule.stages, or raise schedule.target")


def _group(unit: str) -> str:
    return unit.partition(".")[0]


def _to_teacher(kept: list[str], student_unit: str) -> str:
    """The teacher name of a student unit: the j-th kept unit of its group."""
    g, _, j = student_unit.partition(".")
    return [u for u in kept if _group(u) == g][int(j)]


def _to_student(kept: list[str], teacher_unit: str) -> str:
    g = _group(teacher_unit)
    return f"{g}.{[u for u in kept if _group(u) == g].index(teacher_unit)}"


def run_schedule(config: str | Path | dict | RunConfig, progress: bool = True) -> Path:
    """Run (or continue) a schedule; return the run directory."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, RunConfig)
    run = Path(cfg.out)
    check_user_set(cfg.data.synth)
    inputs = input_fingerprints(cfg)
    check_run_dir(run, cfg, inputs)  # refuses changed inputs before anything is written
    made_by = _made_by(cfg, inputs)
    accepted = (made_by, _made_by(cfg, inputs, free=True))  # a selection saved under the earlier digest too
    phases = resolve_protocol(cfg.protocol)
    real = load_dataset(cfg.data.real, cfg.data.image_size)
    prompts = read_prompts(cfg.calibration.prompts)
    embedder = get_embedder(cfg.calibration.embedder)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.teacher, device, dtype=frozen_dtype(cfg.train.frozen_dtype, device))
    inputs = record_revisions(run, cfg, inputs)  # a hub teacher downloaded just now: its commit
    teacher = cast_io(pipe.transformer.eval())
    adapter = adapter_for(teacher, pipe.scheduler.config)

    teacher_params = adapter.block_params(teacher)
    target = cfg.schedule.target * teacher_params
    calib_sampler = pipeline_sampler(pipe, cfg.teacher, cfg.calibration.steps, name="teacher")
    calib = Calibration.build(calib_sampler, embedder, prompts, list(range(len(prompts))))  # teacher reference, once
    conditioning = Conditionings(cfg.data, real, pipe, cfg.teacher, run, cfg.device, cfg.train.seed)
    validator = teacher_validator(pipe, cfg.teacher, real.captions, cfg.train)

    student = student_copy(teacher, cfg.train.student_dtype)
    kept = adapter.units(teacher)  # teacher names of the student's units
    modified: set[str] = set()  # teacher names
    n_stages = 1 if cfg.schedule.kind == "one_shot" else cfg.schedule.stages
    rows = []
    for s in range(n_stages):
        sdir = run / "stages" / f"{s:02d}"
        if (sdir / "done.json").exists():
            done = read_json(sdir / "done.json")
            student = cast_io(load_model(sdir / "student").to(device, DTYPES[cfg.train.student_dtype]))
            kept, modified = done["kept"], set(done["modified"])
            row = read_json(sdir / "metrics.json")
            if cfg.eval.benchmark and saved_metrics(sdir / "eval.json", cfg.eval.benchmark) is None:
                row.update(_evaluate_stage(cfg, pipe, student, sdir))  # scored by another scorer: scored again
                write_json(sdir / "metrics.json", row)
            rows.append(row)
            continue
        params_now = adapter.block_params(student)
        if params_now <= target * (1 + 1e-9):
            break
        plan = _saved_selection(sdir, accepted)
        if plan is None:
            st = _Stage(cfg, pipe, student, calib, embedder)
            if cfg.schedule.kind == "one_shot":
                plan, why = _select_one_shot(st, target)
            elif cfg.schedule.kind == "progressive":
                plan, why = _select_progressive(st, target, {_to_student(kept, u) for u in modified if u in kept},
                                                n_stages - s)
            else:
                plan, why = _select_linear(st, (params_now - target) / (n_stages - s))
            write_json(sdir / "selection.json", {**why, "plan": plan.to_dict(), "made_by": made_by})
        record = apply_plan(adapter, student, plan)
        write_json(sdir / "plan.json", {"plan": plan.to_dict(), "record": record.to_json()})
        # plans name the student's units; KD and trainable selection speak the teacher's
        stage_modified = [_to_teacher(kept, o.unit) for o in plan.ops]
        kept = [_to_teacher(kept, u) for u in record.kept_units]
        modified |= set(stage_modified)
        for kind in dict.fromkeys(ph.dataset for ph in phases):
            conditioning(kind)  # every cache (and synthetic set) the phases need, while the pipeline is whole
        # training needs none of the text encoders and VAE (selection and evaluation, between stages, do)
        with parked(pipe, frozen_components(pipe)):
            student = train_protocol(adapter, teacher, student, kept, stage_modified, phases,
                                     cfg.train.model_dump(), sdir, conditioning, device, progress, validator)
        save_model(student, sdir / "student")
        row = {"stage": s, "units": [o.unit for o in plan.ops], "block_params": adapter.block_params(student),
               "block_param_ratio": adapter.block_params(student) / teacher_params}
        row.update(_evaluate_stage(cfg, pipe, student, sdir))
        write_json(sdir / "metrics.json", row)
        write_json(sdir / "done.json", {"kept": kept, "modified": sorted(modified)})
        rows.append(row)
    save_student(student, run / "student", base=cfg.teacher)
    write_json(run / "summary.json", {"teacher": cfg.teacher, "schedule": cfg.schedule.kind, "stages": rows,
                                      "teacher_block_params": teacher_params,
                                      "student_block_params": adapter.block_params(student),
                                      "description": f"{cfg.schedule.kind} {cfg.schedule.op} of {cfg.teacher} to "
                                                     f"{cfg.schedule.target:.0%} of its block parameters"})
    from slimdit.reports.card import write_card
    from slimdit.reports.html import build_report

    write_card(run / "student", run)
    build_report(run)
    return run


def _made_by(cfg: RunConfig, inputs: dict, free: bool = False) -> str:
    """A digest of what a stage's selection depends on: the config and the contents of its inputs, less the fields a
    rerun may change (:data:`slimdit.identity.FREE_FIELDS`: rerunning a diverged stage with more skipped steps
    must train on the units its checkpoints were trained on, not select again). ``free``: with them, as
    selections saved before 2026-12-06 were digested (still read, so their runs continue)."""
    import hashlib
    import json

    from slimdit.identity import FREE_FIELDS, without_fields, without_revisions

    config = cfg.model_dump(mode="json")
    config = config if free else without_fields(config, FREE_FIELDS)
    key = json.dumps({"config": config, "inputs": without_revisions(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _saved_selection(sdir: Path, made_by: str | tuple[str, ...]) -> Plan | None:
    """The plan a stage selected before the run was stopped (scoring is the costly part of a stage, and a resumed
    stage must train the units its checkpoints were trained on); None when it has none from this config."""
    path = sdir / "selection.json"
    if not path.exists():
        return None
    saved = read_json(path)
    accepted = (made_by,) if isinstance(made_by, str) else made_by
    if saved.get("made_by") not in accepted or "plan" not in saved:  # a selection of another config is redone
        return None
    return Plan.from_dict(saved["plan"])


def _evaluate_stage(cfg: RunConfig, pipe, student, sdir: Path) -> dict:
    if not cfg.eval.benchmark:
        return {}
    from slimdit.metrics.benchmarks import BENCHMARKS
    from slimdit.reports.grids import save_eval_grid

    e = cfg.eval
    original = pipe.transformer
    pipe.transformer = student
    try:
        sampler = pipeline_sampler(pipe, cfg.teacher, e.steps, e.guidance, name="student")
        result = BENCHMARKS[e.benchmark](sampler, limit=e.limit, images_per_prompt=e.images_per_prompt, seed=e.seed,
                                         progress=False)
    finally:
        pipe.transformer = original
    m = result.metrics
    write_json(sdir / "eval.json", m)
    save_eval_grid(result, sdir / "grid.png", e.images_per_prompt)
    return {k: m[k] for k in ("overall", "fid", "cmmd") if k in m}
