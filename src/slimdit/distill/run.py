"""``slimdit distill --config C``: teacher + plan -> protocol phases -> evaluation, in one run directory.

Layout: ``config.yaml``, ``plan.json``, ``cache/`` (conditioning), ``synth/`` (teacher images, when a phase
needs them and none were given), ``phases/NN_name/`` (a trainer run each, with ``checkpoints/``,
``metrics.jsonl`` and, once finished, ``student/``), ``metrics.jsonl`` (all phases), ``student/`` (the final
pipeline), ``metrics/*.json``, ``summary.json``. Rerunning the same config continues where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch

from slimdit.compress.plan import Plan, apply_plan, validate
from slimdit.compress.student import check_plan
from slimdit.config import DistillConfig, load_config
from slimdit.data.cache import cached_conditioning
from slimdit.data.datasets import load_dataset
from slimdit.data.synth import RUN_SET, check_user_set, made_by_run, synthesize
from slimdit.distill.fidelity import teacher_validator
from slimdit.distill.protocols import Phase, phase_steps, resolve_protocol, trainable_units
from slimdit.distill.trainer import TrainConfig, Trainer
from slimdit.identity import check_run_dir, input_fingerprints, record_revisions, without_revisions
from slimdit.io import atomic_write_text, files_fingerprint, read_json, write_json
from slimdit.models import adapter_for
from slimdit.models.precision import DTYPES, cast_io, frozen_dtype, student_copy, weights_dtype
from slimdit.models.storage import load_model, save_model
from slimdit.pipelines.loading import (
    BASE_FILE,
    load_pipeline,
    model_fingerprint,
    pipeline_sampler,
    sampling_defaults,
    save_student,
)
from slimdit.pipelines.placement import frozen_components, parked
from slimdit.processes import process_state
from slimdit.reports.card import write_card


def check_memory(cfg, plan: Plan, device: str, run: Path, captions: int) -> None:
    """Print the memory plan (``cfg.memory_plan``: auto on a GPU, or on) and refuse a run that cannot fit, naming
    the fixes, before any model loads."""
    from slimdit.speed.memory import GIB, config_memory_plan

    if cfg.memory_plan == "off" or (cfg.memory_plan == "auto" and not device.startswith("cuda")):
        return
    state = process_state()
    mp = config_memory_plan(cfg, plan, device, captions, state.num_processes)
    if state.is_main_process:
        print(mp.table(), flush=True)
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "memory_plan.json", mp.to_json())
    if mp.fits is False:
        raise ValueError(f"the run needs {mp.per_device / GIB:.1f} GiB per device and {device} has "
                         f"{mp.device_gib:.1f} GiB; fixes: " + "; ".join(mp.fixes)
                         + " (or memory_plan: off to run anyway)")


def run_distill(config: str | Path | dict | DistillConfig, progress: bool = True) -> Path:
    """Run (or continue) a distillation; return the run directory."""
    cfg = config if isinstance(config, DistillConfig) else load_config(config)
    run = Path(cfg.out)
    plan = Plan.load(cfg.plan) if isinstance(cfg.plan, str) else Plan.from_dict(cfg.plan)
    check_plan(cfg.teacher, plan)  # units and parts against the teacher's config, before anything loads or is written
    check_user_set(cfg.data.synth)
    inputs = input_fingerprints(cfg)
    check_run_dir(run, cfg, inputs)  # refuses changed inputs before anything is written
    phases = resolve_protocol(cfg.protocol)
    real = load_dataset(cfg.data.real, cfg.data.image_size)  # fail on bad data before loading any model
    if plan.grasp is not None and plan.grasp.data is None and len(real.captions) < plan.grasp.images:
        raise ValueError(f"plan grasp.images = {plan.grasp.images}, but data.real ({cfg.data.real}) holds only "
                         f"{len(real.captions)} images; lower grasp.images or name a larger set in grasp.data")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_memory(cfg, plan, device, run, len(real.captions))
    pipe = load_pipeline(cfg.teacher, device, dtype=frozen_dtype(cfg.train.frozen_dtype, device))
    inputs = record_revisions(run, cfg, inputs)  # a hub teacher downloaded just now: its commit
    teacher = cast_io(pipe.transformer.eval())
    adapter = adapter_for(teacher, pipe.scheduler.config)
    validate(adapter, teacher, plan)

    conditioning = Conditionings(cfg.data, real, pipe, cfg.teacher, run, cfg.device, cfg.train.seed)
    student = student_copy(teacher, cfg.train.student_dtype)
    keep = None
    if plan.grasp is not None:
        keep = _grasp(adapter, student, plan, conditioning, run, grasp_made_by(cfg, plan, inputs))
    record = apply_plan(adapter, student, plan, keep=keep)
    write_json(run / "plan.json", {"plan": plan.to_dict(), "record": record.to_json()})
    state = process_state()  # what the trainer's Accelerator uses
    if cfg.eval.benchmark and cfg.eval.untrained and not (run / "untrained" / BASE_FILE).exists():
        if state.is_main_process:
            save_student(student, run / "untrained", base=cfg.teacher)
        state.wait_for_everyone()

    validator = teacher_validator(pipe, cfg.teacher, real.captions, cfg.train)
    for kind in dict.fromkeys(ph.dataset for ph in phases):
        conditioning(kind)  # every cache (and synthetic set) the phases need, while the pipeline is whole
    # training needs none of the text encoders and VAE; a sharded run's trainer holds the teacher as shards
    idle = frozen_components(pipe) + (["transformer"] if cfg.train.sharding == "fsdp" else [])
    with parked(pipe, idle):
        student = train_protocol(adapter, teacher, student, record.kept_units, [u.unit for u in record.units],
                                 phases, cfg.train.model_dump(), run, conditioning, device, progress, validator)

    if not state.is_main_process:  # saving, evaluating and benchmarking are the main process's
        return run
    save_student(student, run / "student", base=cfg.teacher)
    summary = {"teacher": cfg.teacher, "student": str(run / "student"),
               "block_params": {"teacher": record.block_params_before, "student": record.block_params_after,
                                "ratio": record.block_params_after / record.block_params_before}}
    if cfg.eval.benchmark:
        summary.update(_evaluate(cfg, run))
    if cfg.eval.bench:
        if not (run / "bench.json").exists():
            from slimdit.speed.bench import bench_transformers

            same = copy.deepcopy(student).to(teacher.device, weights_dtype(teacher)).eval()  # as the teacher
            write_json(run / "bench.json", bench_transformers(pipe, same, sampling_defaults(cfg.teacher),
                                                              steps=cfg.eval.steps).to_json())
        b = read_json(run / "bench.json")
        summary["bench"] = {k: b[k] for k in ("latency_ratio", "param_ratio", "flop_ratio")}
    write_json(run / "summary.json", summary)
    write_card(run / "student", run)  # after the evaluation: the card carries its numbers
    return run


def grasp_made_by(cfg: DistillConfig, plan: Plan, inputs: dict) -> dict:
    """What a run's GRASP factors were made from (kept beside them; factors made otherwise are made again): the
    plan, the inputs without their hub revisions (a bare record gaining its revision is check_run_dir's business,
    not a reason to make them again), the data and the seed."""
    return {"plan": plan.to_dict(), "inputs": without_revisions(inputs), "data": cfg.data.model_dump(mode="json"),
            "seed": cfg.train.seed}


def _grasp(adapter, model, plan: Plan, conditioning, run: Path, made_by: dict) -> dict[str, torch.Tensor]:
    """The singular values GRASP keeps (thesis section 4.4.4), calibrated on ``plan.grasp.data`` or the run's real
    set; kept in ``grasp.json`` with what they were made from (``made_by``: plan, inputs, data settings, seed), so
    that a resumed run factors exactly as the first attempt did (a GPU may break ties differently on a rerun)."""
    from slimdit.compress.grasp import grasp_from_data

    path = run / "grasp.json"
    if path.exists() and (saved := read_json(path)).get("made_by") == made_by:
        return {k: torch.tensor(v) for k, v in saved["keep"].items()}
    spec = plan.grasp
    if spec.data is None:
        data = conditioning("real")
    else:
        with process_state().main_process_first():  # the main process caches, the others read
            data = cached_conditioning(conditioning.pipe, conditioning.teacher, load_dataset(spec.data),
                                       run / "cache", conditioning.max_len)
    keep = grasp_from_data(adapter, model, plan, data, made_by["seed"])
    write_json(path, {"made_by": made_by, "keep": {k: v.tolist() for k, v in keep.items()}})
    return keep


def train_protocol(adapter, teacher, student, kept_units: list[str], modified: list[str], phases: list[Phase],
                   train_fields: dict, run: Path, conditioning, device: str, progress: bool = True, validate=None):
    """Run the protocol's phases on ``student`` under ``run/phases/``; finished phases are loaded, not redone.

    ``conditioning(kind)`` returns the cached data of a phase's dataset (``real`` or ``synth``); ``validate``, if
    given, is the trainer's validation (``slimdit.distill.fidelity.teacher_validator``).
    """
    state = process_state()  # what the trainer's Accelerator uses
    teacher_units = adapter.units(teacher)
    steps = phase_steps(phases, train_fields["steps"])
    for i, (ph, n) in enumerate(zip(phases, steps)):
        pdir = run / "phases" / f"{i:02d}_{ph.name}"
        if (pdir / "done.json").exists():
            student = cast_io(load_model(pdir / "student").to(device, DTYPES[train_fields["student_dtype"]]))
            continue
        units = trainable_units(ph.trainable, teacher_units, kept_units, modified)
        if units == []:  # nothing of this kind to train (e.g. "modified" in a removal-only plan)
            if state.is_main_process:
                save_model(student, pdir / "student")
                write_json(pdir / "done.json", {"phase": ph.name, "steps": 0, "trainable": []})
            state.wait_for_everyone()
            continue
        tcfg = TrainConfig(**{**train_fields, "steps": n, "betas": tuple(train_fields["betas"]),
                              "eps": tuple(train_fields["eps"])})
        t0 = time.time()
        trainer = Trainer(adapter, teacher, student, conditioning(ph.dataset), tcfg, pdir, kept_units, units,
                          validate)
        last = trainer.train(progress=progress)
        student = trainer.student_model(use_ema=tcfg.ema_decay is not None).to(device)
        if state.is_main_process:  # one writer; the others wait until the phase is on disk
            save_model(student, pdir / "student")
            write_json(pdir / "done.json", {"phase": ph.name, "steps": n, "trainable": units or "all",
                                            "seconds": round(time.time() - t0, 1), "last": last})
            _phase_log(run)
        state.wait_for_everyone()
    return student


def _phase_log(run: Path) -> None:
    """``run/metrics.jsonl``: each finished phase's last logged losses, rebuilt from the phases' ``done.json`` (so
    a kill between two writes can neither drop nor repeat a row)."""
    rows = [{"phase": d["phase"], **d["last"]} for d in map(read_json, sorted(run.glob("phases/*/done.json")))
            if "last" in d]
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


class Conditionings:
    """The cached conditioning of a run's datasets, built on first use: ``real``, and ``synth`` (teacher images
    on the real captions, as LAION-PixArt, at the teacher's default sampling, thesis table 4.3)."""

    def __init__(self, data_cfg, real, pipe, teacher: str, run: Path, device: str | None, seed: int):
        self.cfg, self.real, self.pipe, self.teacher, self.run = data_cfg, real, pipe, teacher, run
        self.device, self.seed = device, seed
        self.max_len = data_cfg.max_sequence_length or sampling_defaults(teacher)["max_sequence_length"]
        self.cache: dict = {}

    def __call__(self, kind: str):
        if kind not in self.cache:
            # under several processes the main one builds a missing cache (or synthetic set); the others then read it
            with process_state().main_process_first():
                self.cache[kind] = self._load(kind)
        return self.cache[kind]

    def _load(self, kind: str):
        if kind == "real":
            data = self.real
        else:
            folder = self._synth(Path(self.cfg.synth) if self.cfg.synth else self.run / "synth")
            data = load_dataset(str(folder), self.cfg.image_size)
        return cached_conditioning(self.pipe, self.teacher, data, self.run / "cache", self.max_len)

    def _synth(self, out: Path) -> Path:
        """Generate (or finish generating) the synthetic set into ``out``; a finished folder is used as is, so runs
        that name the same ``data.synth`` share one set (``synthesize`` refuses a folder made otherwise)."""
        if not made_by_run(out):  # the user's folder (own images, or slimdit synth's): used as it is
            check_user_set(out)
            return out
        prompts = self.real.captions[:self.cfg.synth_images]
        sampler = pipeline_sampler(self.pipe, self.teacher, name="teacher")
        synthesize(sampler, prompts, out, seed=self.seed, model=self.teacher,
                   prompt_source=f"the first {len(prompts)} captions of {self.real.source}", by=RUN_SET)
        return out


def _weights_digest(folder: Path) -> str:
    """The weight files' digest of a saved model (its config, which records where it was loaded from, left out):
    one plan gives other weights where GRASP calibrated on other data or the student is kept in another precision."""
    return "+".join(files_fingerprint(f) for f in sorted(folder.glob("*.safetensors")))


def _evaluate(cfg: DistillConfig, run: Path) -> dict:
    from slimdit.metrics.benchmarks import BENCHMARKS
    from slimdit.metrics.evaluate import saved_metrics, saved_or_evaluated

    e = cfg.eval
    out = {}
    models = [("teacher", cfg.teacher), ("student", str(run / "student"))]
    if cfg.eval.untrained:
        models.insert(1, ("untrained", str(run / "untrained")))
    settings = e.model_dump(mode="json", include={"benchmark", "limit", "images_per_prompt", "steps", "guidance",
                                                 "seed"})
    plan = read_json(run / "plan.json")["plan"] if e.shared is not None else None
    weights = model_fingerprint(cfg.teacher) if e.shared is not None else None
    for name, model in models:
        path = run / "metrics" / f"{name}.json"
        shared = None
        if e.shared is not None and name != "student":  # the same teacher and plan give the same images
            key = {"teacher": cfg.teacher, "weights": weights, "eval": settings,
                   **({"scored_by": scorer()} if (scorer := BENCHMARKS[e.benchmark].scorer) else {}),
                   **({"plan": plan, "untrained": _weights_digest(run / "untrained" / "transformer")}
                      if name == "untrained" else {})}
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            shared = Path(e.shared) / f"{name}-{digest}.json"
            if shared.exists() and saved_metrics(path, e.benchmark) is None:  # the key holds the scorer
                write_json(path, read_json(shared))
        m = saved_or_evaluated(path, model, e.benchmark, limit=e.limit, images_per_prompt=e.images_per_prompt,
                               seed=e.seed, steps=e.steps, guidance=e.guidance)
        if shared is not None and not shared.exists():
            write_json(shared, m)
        out[name + "_metrics"] = {k: m[k] for k in ("overall", "fid", "cmmd") if k in m}
    return out
