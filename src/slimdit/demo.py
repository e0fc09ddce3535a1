"""``slimdit demo``: the main job on the embedded default, end to end.

On the built-in teacher ``shapes-pixart``: analyze its blocks (magnitude, CKA, metric importance), compress it
with linear progressive SVD over several stages with ``normalized_hybrid`` KD retraining after each
(:mod:`slimdit.schedules.run`), evaluate teacher and student on shapes-geneval, measure each stage's sampling
latency against the teacher, and write one run directory with ``summary.json`` and ``report.html``.

The run is resumable: analysis, stages, evaluations and benchmarks that finished are loaded, not redone.
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

import yaml
from pydantic import Field

from slimdit.config import RunConfig, TrainSection, _Strict, load_config
from slimdit.distill.fewstep import RefineSection
from slimdit.identity import check_run_dir, input_fingerprints, spec_contents, without_revisions
from slimdit.io import read_json, write_json

TEACHER = "shapes-pixart"
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class AnalysisSection(_Strict):
    criteria: list[str] = ["magnitude", "cka", "metric"]
    prompts: str = "shapes-train:16:11"  # never evaluation prompts
    steps: int | None = None


class BenchSection(_Strict):
    repeats: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)


class FewStepSection(_Strict):
    """``slimdit demo --steps N``: after the size stages, progressive distillation of the compressed student from
    its ``start`` deterministic steps down to ``steps``, then a refining round on those steps (``refine``: DMD2 by
    default, saving an EMA of its student, or LADD; null: none) (:mod:`slimdit.distill.fewstep`)."""

    steps: int | None = Field(None, ge=1)  # None: no step distillation
    start: int = Field(16, ge=2)
    train: TrainSection = TrainSection(steps=250, batch_size=32, optimizer="adamw", lr=1e-4, warmup_steps=20,
                                       grad_clip=1.0, weight_decay=0.0, val_every=0, checkpoint_every=50)
    refine: RefineSection | None = RefineSection(method="dmd2", steps=200, lr=1e-4, ema_decay=0.99)
    disc_lr: float = Field(3e-3, gt=0)  # a LADD refine: the discriminator heads' learning rate
    fake_updates: int = Field(2, ge=1)  # a DMD2 refine: the fake score's steps per student step
    fake_lr: float = Field(1e-4, gt=0)  # a DMD2 refine: the fake score's learning rate


class DemoConfig(RunConfig):
    """A schedule run (:class:`RunConfig`) plus the demo's analysis, benchmark and few-step settings."""

    analysis: AnalysisSection = AnalysisSection()
    bench: BenchSection = BenchSection()
    fewstep: FewStepSection = FewStepSection()


def default_config() -> dict:
    """The demo's packaged config (``slimdit/demo.yaml``) as a dict."""
    return yaml.safe_load(resources.files("slimdit").joinpath("demo.yaml").read_text())


def demo_config(out: str | Path, overrides: dict | None = None) -> DemoConfig:
    """The packaged config with ``out`` and ``overrides``. Its fixed units per stage are sized for the packaged
    teacher's equal blocks; another teacher (a Flux, whose double blocks are 2.4 times its single ones) gets
    ``units_per_stage: auto``, which fits each stage to eq. 4.21, unless ``overrides`` names it."""
    raw = {**default_config(), "out": str(out)}
    overrides = overrides or {}
    if overrides.get("teacher", raw["teacher"]) != raw["teacher"] and "schedule.units_per_stage" not in overrides:
        raw["schedule"] = {**raw["schedule"], "units_per_stage": "auto"}
    return load_config(raw, DemoConfig, overrides)


def _summary(m: dict, block_params: int | None = None) -> dict:
    s = {"shapes_geneval_overall": m["overall"], "fid": m["fid"], "cmmd": m["cmmd"],
         **{k: m[k] for k in CATEGORIES if k in m}}
    if "clip_score" in m:
        s["clip_score"] = m["clip_score"]
    if block_params is not None:
        s["block_params"] = block_params
    return s


def _refine_settings(f) -> dict:
    """The few-step section's settings that its refining round's method reads (none without a round): the steps
    config refuses a method's settings given to another."""
    from slimdit.distill.fewstep import owned_settings

    if f.refine is None:
        return {}
    return {k: getattr(f, k) for k in owned_settings(f.refine.method) if k in type(f).model_fields}


def _fewstep(cfg: DemoConfig, run: Path, size: dict, teacher: dict, progress: bool) -> dict:
    """Step-distil the compressed student (``run/student``) into ``run/steps``; its summary beside the teacher's:
    steps, quality retained, block parameter ratio, and per-image latency against the teacher at its own steps,
    measured side by side."""
    from slimdit.distill.fewstep import StepsConfig, run_steps
    from slimdit.speed.bench import bench

    f, e = cfg.fewstep, cfg.eval
    scfg = StepsConfig(teacher=str(run / "student"), out=str(run / "steps"), steps=f.steps,
                       start=max(f.start, 2 * f.steps), data=cfg.data, train=f.train, device=cfg.device,
                       refine=f.refine, **_refine_settings(f),
                       eval={"benchmark": "shapes-geneval", "limit": e.limit, "images_per_prompt": e.images_per_prompt,
                             "seed": e.seed, "bench": False})
    sdir = run_steps(scfg, progress=progress)
    if not (sdir / "bench.json").exists():
        write_json(sdir / "bench.json", bench(str(sdir / "student"), cfg.teacher, repeats=cfg.bench.repeats,
                                              batch_size=cfg.bench.batch_size, device=cfg.device).to_json())
    b = read_json(sdir / "bench.json")
    m = _summary(read_json(sdir / "metrics" / "student.json"), size.get("block_params"))
    t = teacher["shapes_geneval_overall"]
    return {**m, "steps": f.steps, "block_param_ratio": size["block_param_ratio"],
            "retained_overall": m["shapes_geneval_overall"] / t if t > 0 else None,
            "latency_ratio": b["latency_ratio"], "flop_ratio": b["flop_ratio"], "model": str(sdir / "student")}


def analysis_made_by(analysis: AnalysisSection, teacher: str, op) -> dict:
    """What the demo's analysis was made from (kept beside it; an analysis made otherwise is redone): the teacher's
    fingerprint, the analysis settings, the operation scored, and a prompt file's contents (a registered spec is its
    own identity, and adds nothing, so runs recorded before this was recorded keep their analysis)."""
    made_by = {"teacher": teacher, **analysis.model_dump(mode="json"), "op": op}
    if (files := spec_contents(analysis.prompts)) != analysis.prompts:
        made_by["prompts_files"] = files
    return made_by


def run_demo(out: str | Path, overrides: dict | None = None, progress: bool = True) -> Path:
    """Run (or continue) the full demo into ``out``; return the run directory."""
    from slimdit.data.synth import read_prompts
    from slimdit.importance.analyze import analyze
    from slimdit.metrics.evaluate import evaluate_model, saved_metrics
    from slimdit.models import adapter_for
    from slimdit.models.storage import load_model
    from slimdit.pipelines.loading import load_pipeline, sampling_defaults
    from slimdit.reports.card import write_card
    from slimdit.reports.grids import save_eval_grid
    from slimdit.reports.html import build_report
    from slimdit.schedules.run import run_schedule
    from slimdit.speed.bench import bench_transformers

    cfg = demo_config(out, overrides)
    run = Path(cfg.out)
    if (run / "summary.json").exists() and "student" in read_json(run / "summary.json"):
        raise FileExistsError(f"{run} already holds a finished demo run; choose another --out")
    t0 = time.time()
    timings = read_json(run / "timings.json") if (run / "timings.json").exists() else {}

    def timed(name: str, fn, add: bool = True):  # add: to an earlier attempt's time (a part continued, not redone)
        start = time.time()
        result = fn()
        timings[name] = round((timings.get(name, 0.0) if add else 0.0) + time.time() - start, 1)
        write_json(run / "timings.json", timings)
        return result

    inputs = input_fingerprints(cfg)
    check_run_dir(run, cfg, inputs)  # before any work: refuses a run made from other inputs
    # 1. which blocks matter (plots for the report; the schedule scores units itself at each stage)
    op = cfg.schedule.c_fixed if cfg.schedule.op == "svd" else "remove"
    made_by = analysis_made_by(cfg.analysis, without_revisions(inputs["teacher"]), op)
    done = run / "analysis" / "made_by.json"
    if not (done.exists() and read_json(done) == made_by):  # an analysis of other settings is redone, not kept
        shutil.rmtree(run / "analysis", ignore_errors=True)
        prompts = read_prompts(cfg.analysis.prompts)
        timed("analysis", lambda: analyze(cfg.teacher, cfg.analysis.criteria, run / "analysis", prompts, op=op,
                                          steps=cfg.analysis.steps), add=False)  # redone: its time replaces
        write_json(done, made_by)
    # 2. the schedule: select, compress, retrain, evaluate, stage by stage
    timed("schedule", lambda: run_schedule(cfg, progress=progress))
    sched = read_json(run / "summary.json")
    stages = sched["stages"]
    # 3. the teacher on the same prompts and seeds as the students
    e = cfg.eval
    teacher_json = run / "metrics" / "teacher.json"
    teacher_m = saved_metrics(teacher_json, "shapes-geneval")  # None: not made yet, or by another scorer
    if teacher_m is None:
        result = timed("teacher_eval", lambda: evaluate_model(
            cfg.teacher, out=teacher_json, limit=e.limit, images_per_prompt=e.images_per_prompt, seed=e.seed,
            steps=e.steps, guidance=e.guidance), add=False)  # made again (another scorer): its time replaces
        save_eval_grid(result, run / "grid_1_teacher.png", e.images_per_prompt)
        teacher_m = result.metrics
    last = run / "stages" / f"{stages[-1]['stage']:02d}"
    write_json(run / "metrics" / "student.json", read_json(last / "eval.json"))
    for suffix in (".png", ".txt"):  # the same prompts and seeds as the teacher's grid
        if (last / f"grid{suffix}").exists():
            shutil.copy(last / f"grid{suffix}", run / f"grid_2_student{suffix}")
    # 4. latency of every stage's student against the teacher, measured side by side
    pipe = load_pipeline(cfg.teacher, cfg.device)
    defaults = sampling_defaults(cfg.teacher)
    for row in stages:
        sdir = run / "stages" / f"{row['stage']:02d}"
        if not (sdir / "bench.json").exists():
            student = load_model(sdir / "student").to(pipe.transformer.device).eval()
            r = timed("bench", lambda s=student: bench_transformers(pipe, s, defaults, cfg.bench.repeats,
                                                                    cfg.bench.batch_size))
            write_json(sdir / "bench.json", r.to_json())
        b = read_json(sdir / "bench.json")
        row.update(latency_ratio=b["latency_ratio"], flop_ratio=b["flop_ratio"])
    teacher_params = adapter_for(pipe.transformer).block_params(pipe.transformer)
    final = stages[-1]
    student = {**_summary(read_json(last / "eval.json"), final["block_params"]),
               "block_param_ratio": final["block_param_ratio"], "latency_ratio": final["latency_ratio"],
               "flop_ratio": final["flop_ratio"]}
    teacher = _summary(teacher_m, teacher_params)
    student["retained_overall"] = (student["shapes_geneval_overall"] / teacher["shapes_geneval_overall"]
                                   if teacher["shapes_geneval_overall"] > 0 else None)
    extra = {}
    if cfg.fewstep.steps:  # 5. the compressed student in fewer steps; the final student is that one
        extra["size_student"] = student
        student = timed("fewstep", lambda: _fewstep(cfg, run, student, teacher, progress))
    write_json(run / "summary.json", {
        "description": f"{cfg.schedule.kind} {cfg.schedule.op} of {cfg.teacher} to {cfg.schedule.target:.0%} of "
                       f"its block parameters over {len(stages)} stage(s), {cfg.train.kd} KD, protocol "
                       f"{cfg.protocol if isinstance(cfg.protocol, str) else 'custom'}; evaluated on the first "
                       f"{e.limit} shapes-geneval prompts x {e.images_per_prompt} images",
        "teacher": teacher,
        "student": student,
        "schedule": cfg.schedule.kind,
        "stages": stages,
        **extra,
        "timings_s": timings,
        "elapsed_s": round(time.time() - t0, 1),
    })
    write_card(run / "student", run)  # again, now with the teacher's metrics and the latency beside the student's
    build_report(run)
    return run
