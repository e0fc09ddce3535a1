"""Typed run configs, validated before any heavy work; errors name the field, the value and what is allowed."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimdit.registry import is_spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    real: str = "shapes-train:2048"  # shapes-train:N[:SEED] or an imagefolder with metadata.jsonl
    # teacher-generated folder: a user's folder is used as it is; a missing one is generated there (so runs naming
    # the same folder share it); None: generated into the run directory when a phase needs it
    synth: str | None = None
    synth_images: int = Field(512, ge=1)
    image_size: int | None = None  # resize folder images to this (pixels)
    max_sequence_length: int | None = None  # default: the model's


def sharding_problem(sharding: str, optimizer: str, mixed_precision: str, ema_decay: float | None,
                     max_skipped_steps: int, offload_optimizer: bool) -> str | None:
    """What is wrong with a training section's sharding settings, or None."""
    if sharding not in ("none", "fsdp", "zero2", "zero3"):
        return f"train.sharding: {sharding!r} is not one of none, fsdp, zero2, zero3"
    if offload_optimizer and sharding not in ("zero2", "zero3"):
        return "train.offload_optimizer needs train.sharding: zero2 or zero3 (DeepSpeed offloads the optimizer)"
    if sharding == "none":
        return None
    if optimizer != "adamw":
        return (f"train.sharding: {sharding} needs train.optimizer: adamw (CAME's factored second moments do not "
                "run on sharded or flattened parameters)")
    if mixed_precision == "fp16":
        return f"train.sharding: {sharding} runs with train.mixed_precision bf16 or no, not fp16"
    if sharding.startswith("zero") and max_skipped_steps:
        return (f"train.sharding: {sharding} cannot skip a non-finite step (DeepSpeed steps inside the backward): "
                "set train.max_skipped_steps: 0")
    if sharding.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return f"train.sharding: {sharding} needs DeepSpeed, which is not installed: pip install 'slimdit[deepspeed]'"
    if sharding == "zero3" and ema_decay is not None:
        return ("train.sharding: zero3 partitions the weights, which an EMA would have to gather every step: "
                "use zero2 or fsdp with train.ema_decay, or drop the EMA")
    return None


class TrainSection(_Strict):
    steps: int = Field(1000, ge=1)
    optimizer: Literal["came", "adamw"] = "came"
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.03, ge=0)
    betas: tuple[float, ...] = (0.9, 0.999, 0.9999)
    eps: tuple[float, ...] = (1e-30, 1e-16)
    warmup_steps: int = Field(1000, ge=1)
    # after warm-up: constant (the thesis') or a cosine to 0 at the end of each phase (short runs end calmer)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(0.001, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # recompute each block's activations in the backward instead of keeping them (the memory plan says how much
    # that saves); the gradients are the same
    gradient_checkpointing: bool = False
    # none: every process holds whole models (DDP); fsdp: teacher, student, gradients and optimizer states sharded
    # over the processes, one shard group per block (torch FSDP2; needs optimizer: adamw); zero2 / zero3: DeepSpeed
    # ZeRO partitions the student's gradients and optimizer states (zero3: and weights) (pip install
    # 'slimdit[deepspeed]'; needs optimizer: adamw)
    sharding: Literal["none", "fsdp", "zero2", "zero3"] = "none"
    offload_optimizer: bool = False  # zero2 / zero3: optimizer states and step in host memory
    # the frozen teacher, text encoders and VAE (auto: bf16 on a GPU that has it, else fp32); the trained student:
    # fp32 (master weights, with mixed_precision's autocast) or bf16 (weights, gradients and optimizer states)
    frozen_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    student_dtype: Literal["fp32", "bf16"] = "fp32"
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # the thesis' presets (section 5.1.4), and published recipes: tinyfusion, bk_sdm, flux_mini
    kd: Literal["output", "standard", "hybrid", "normalized", "normalized_hybrid", "tinyfusion", "bk_sdm",
                "flux_mini"] = "normalized_hybrid"
    checkpoint_every: int = Field(500, ge=1)
    # optimizer steps with a non-finite loss or gradient that may be skipped (each logged in metrics.jsonl)
    # before the run stops; 0: the first one stops it, naming the step and the last finite checkpoint
    max_skipped_steps: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    # every val_every steps, the student's trajectory MSE against the teacher on val_prompts captions of the real
    # set, sampled once by the teacher (slimdit.distill.fidelity); 0 turns it off
    val_every: int = Field(50, ge=0)
    val_prompts: int = Field(8, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sharding_needs(self):
        if problem := sharding_problem(self.sharding, self.optimizer, self.mixed_precision, self.ema_decay,
                                       self.max_skipped_steps, self.offload_optimizer):
            raise ValueError(problem)
        if self.student_dtype == "bf16" and self.mixed_precision == "fp16":
            raise ValueError("student_dtype: bf16 goes with mixed_precision bf16, no or auto, not fp16")
        return self


class PhaseSection(_Strict):
    name: str
    trainable: list[Literal["preceding", "modified", "all"]]
    dataset: Literal["real", "synth"]
    fraction: float = Field(gt=0)


class EvalSection(_Strict):
    benchmark: str | None = "shapes-geneval"  # a registered benchmark (slimdit.registry.BENCHMARKS)
    limit: int | None = Field(60, ge=1)
    images_per_prompt: int = Field(4, ge=1)
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    untrained: bool = True  # distill: also evaluate the compressed student before training
    bench: bool = True  # distill: measure sampling latency against the teacher (slimdit bench)
    # distill: a folder where the teacher's and the untrained student's metrics are kept and reused by other
    # runs with the same teacher, plan and eval settings (a sweep sets it; evaluation is seeded, so reuse is exact)
    shared: Path | None = None


    @field_validator("benchmark")
    @classmethod
    def _benchmark_known(cls, v):
        from slimdit.registry import BENCHMARKS

        if v is not None and v not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {v!r}; allowed: {', '.join(BENCHMARKS)} (or null for none)")
        return v


class TeacherSource(_Strict):
    """A teacher whose transformer comes from elsewhere: ``teacher: {pipeline: BASE, transformer: REPO_OR_DIR}``."""

    pipeline: str
    transformer: str | None = None


def _teacher_string(v: Any) -> Any:
    """``teacher`` as the one MODEL string the rest of slimdit reads (``slimdit.pipelines.loading.join_model``)."""
    if isinstance(v, dict):
        from slimdit.pipelines.loading import join_model

        src = TeacherSource(**v)
        return join_model(src.pipeline, src.transformer)
    return v


class DistillConfig(_Strict):
    teacher: str
    _teacher = field_validator("teacher", mode="before")(_teacher_string)
    # the memory plan (slimdit.speed.memory) at the start of the run, before any model loads: auto traces it on a
    # GPU (and refuses a run that cannot fit); on: also on a CPU (against the host's available memory); off: never
    memory_plan: Literal["auto", "on", "off"] = "auto"
    plan: dict[str, Any] | str  # inline plan or a plan file
    out: Path
    protocol: Literal["three_stage", "two_stage", "real_only"] | list[PhaseSection] = "three_stage"
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    device: str | None = None

    @field_validator("plan")
    @classmethod
    def _plan_exists(cls, v):
        if isinstance(v, str) and not Path(v).exists():
            raise ValueError(f"plan file {v} does not exist")
        return v


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"])
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {field}: {err['msg']}{got}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(source: str | Path | dict, model: type[BaseModel] = DistillConfig,
                overrides: dict | None = None) -> Any:
    """Load YAML (or a dict), apply ``overrides`` (dotted keys, e.g. ``train.kd``), validate; raise ValueError
    naming every bad field."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides write into nested sections: never into the caller's dict
    else:
        raw = read_config_file(source)
    for key, value in (overrides or {}).items():
        node = raw
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[leaf] = value
    try:
        return model.model_validate(with_section_defaults(model, raw))
    except ValidationError as e:
        raise ValueError(_format(e)) from None


def with_section_defaults(model: type[BaseModel], raw: dict) -> dict:
    """``raw`` with each section it gives filled from that section's default in ``model``: a config class may set
    its own section defaults (a step run's ``train`` is AdamW at 1e-4), and a file or ``--set`` naming one field
    of the section keeps the others as that class sets them, not as the section's class does."""
    out = dict(raw)
    for name, field in model.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel) and isinstance(raw.get(name), dict):
            out[name] = with_section_defaults(type(default), {**default.model_dump(exclude_unset=True), **raw[name]})
    return out


# config fields that name files to read: in a config file they are relative to the file's folder
INPUT_PATHS = ("plan", "data.real", "data.synth", "calibration.prompts", "base")


def resolve_input(value: Any, base: str | Path) -> Any:
    """A relative input path written in a file in folder ``base``: the absolute path beside that file when it
    exists there, else the path as written (the working directory's, e.g. a folder a run will create).
    Registered dataset specs (``shapes-train:...``) stay as they are."""
    if not isinstance(value, str) or is_spec(value) or Path(value).is_absolute():
        return value
    beside = Path(base) / value
    return os.path.abspath(beside) if beside.exists() else value


def resolve_inputs(raw: dict, base: str | Path, dotted: bool = False) -> dict:
    """Resolve the :data:`INPUT_PATHS` of a nested config dict (or of ``--set``-style dotted overrides) against the
    folder ``base`` of the file they were written in."""
    for key in INPUT_PATHS:
        if dotted:
            if key in raw:
                raw[key] = resolve_input(raw[key], base)
            continue
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = resolve_input(node[leaf], base)
    return raw


def read_config_file(path: str | Path) -> dict:
    """A YAML config file as a dict, its input paths resolved against its folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {p} does not hold a mapping of fields")
    return resolve_inputs(raw, p.parent)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    from slimdit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def parse_sets(items: list[str]) -> dict:
    """``["train.kd=hybrid", "train.steps=50"]`` -> ``{"train.kd": "hybrid", "train.steps": 50}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


class CalibrationSection(_Strict):
    prompts: str = "shapes-train:32:7"  # file or shapes-train:N[:SEED]; never evaluation prompts
    steps: int | None = None  # sampling steps while scoring (default: the model's)
    embedder: str = "shapes"


class ScheduleSection(_Strict):
    kind: Literal["one_shot", "progressive", "linear_progressive"] = "linear_progressive"
    op: Literal["svd", "remove"] = "svd"
    target: float = Field(0.6, gt=0, lt=1)  # block parameters kept at the end, as a fraction of the teacher's
    stages: int = Field(2, ge=1)
    # k of eq. 4.16-4.21, or auto: per stage, the k that puts the stage's share nearest the middle of eq. 4.21's
    # feasible range (for units of different sizes, such as a Flux's double and single blocks)
    units_per_stage: Annotated[int, Field(ge=1)] | Literal["auto"] = 4
    base_ratio: float = Field(0.6, gt=0, lt=1)  # S: the ratio of the least important unit
    c_fixed: float = Field(0.3, gt=0, lt=1)  # the ratio every unit is scored at (eq. 4.15)
    svd_ratio: float = Field(0.5, gt=0, lt=1)  # per-unit ratio of one-shot and progressive SVD
    cmmd_threshold: float = Field(0.1, gt=0)  # progressive: add units until the calibration CMMD exceeds this


class RunConfig(_Strict):
    teacher: str
    _teacher = field_validator("teacher", mode="before")(_teacher_string)
    out: Path
    schedule: ScheduleSection = ScheduleSection()
    calibration: CalibrationSection = CalibrationSection()
    protocol: Literal["three_stage", "two_stage", "real_only"] | list[PhaseSection] = "three_stage"
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection()  # per stage
    eval: EvalSection = EvalSection()
    device: str | None = None
