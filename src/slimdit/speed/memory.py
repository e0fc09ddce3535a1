"""A memory plan before heavy work: per-device bytes of a distillation run, from the models' configs alone.

Weights, gradients and optimizer states are counted exactly from the parameter shapes (every component built on
the meta device from its ``config.json``, :mod:`slimdit.speed.shapes`; a plan's student counted from the
teacher's shapes and the plan's ranks). Activations are traced (:mod:`slimdit.speed.activations`): the real KD
loss runs forward and backward under ``FakeTensorMode`` on small cuts of the model at the real batch, resolution
and caption length, with and without gradient checkpointing, and the per-unit cost is scaled to the student's
units. Nothing is allocated and no weight is read.

Training holds the frozen teacher, the student's weights, gradients and optimizer states, and the activations of
a micro-batch; the text encoders and the VAE run before it (filling the conditioning and latent caches), then
wait in host memory (``slimdit distill`` parks them), so a distill plan leaves them out. With ``train.sharding:
fsdp`` the teacher, the student's weights, gradients and optimizer states are divided among the processes; with
``zero2`` the student's gradients and optimizer states (plus ZeRO's fp32 weight partition), with ``zero3`` its
weights too; ``train.offload_optimizer`` moves the optimizer states and that partition to host memory. Over one
process nothing is divided, as the trainer then shards nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slimdit.compress.plan import Plan, svd_layers, validate
from slimdit.models import adapter_for
from slimdit.speed.activations import activation_bytes, vae_scale_of
from slimdit.speed.shapes import (
    build_component,
    component_configs,
    numel,
    optimizer_bytes,
    param_count,
    read_model_file,
)

GIB = 2**30
_SHARDING_NAMES = {"fsdp": ", sharded (FSDP)", "zero2": ", DeepSpeed ZeRO-2", "zero3": ", DeepSpeed ZeRO-3"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryPlan:
    """Bytes per device of each item, what they add up to, and whether that fits the device."""

    model: str
    processes: int
    sharding: str  # none | fsdp | zero2 | zero3
    batch_size: int
    resolution: int
    checkpointing: bool
    items: dict[str, int]  # per device, during training
    activations: dict[str, int]  # per device: {"plain": ..., "checkpointed": ...}
    host: dict[str, int]  # host RAM: the conditioning cache, ZeRO's offloaded optimizer
    params: dict[str, int]  # parameter counts: components, student, trainable
    device_gib: float | None = None
    fixes: list[str] = field(default_factory=list)

    @property
    def per_device(self) -> int:
        return sum(self.items.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_gib is None else self.per_device / GIB <= self.device_gib

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory"] = {"per_device_gib": round(self.per_device / GIB, 3), "fits": self.fits,
                       "device_gib": self.device_gib,
                       "items_gib": {k: round(v / GIB, 3) for k, v in self.items.items()}}
        return d

    def table(self) -> str:
        rows = [f"memory plan for {self.model}: batch {self.batch_size} at {self.resolution} px, {self.processes} "
                f"process(es){_SHARDING_NAMES.get(self.sharding, '')}, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}"]
        rows += [f"  {k:<22} {v / GIB:9.2f} GiB" for k, v in self.items.items()]
        rows.append(f"  {'per device':<22} {self.per_device / GIB:9.2f} GiB"
                    + ("" if self.device_gib is None else f" of {self.device_gib:.1f} GiB: "
                       + ("fits" if self.fits else "does NOT fit")))
        a = self.activations
        if len(a) == 2:
            rows.append(f"  activations: {a['plain'] / GIB:.2f} GiB plain, {a['checkpointed'] / GIB:.2f} GiB with "
                        "gradient checkpointing")
        rows += [f"  host: {k} {v / GIB:.2f} GiB" for k, v in self.host.items()]
        rows += [f"  fix: {f}" for f in self.fixes]
        return "\n".join(rows)


# ---- the plan -------------------------------------------------------------------------------------------------
def memory_plan(model: str, plan: Plan, batch_size: int, resolution: int | None = None, *,
                frozen_dtype: str = "fp32", student_dtype: str = "fp32", mixed_precision: str = "no",
                optimizer: str = "came",
                checkpointing: bool = False, processes: int = 1, sharding: str = "none",
                offload_optimizer: bool = False,
                kd: str = "normalized_hybrid", captions: int = 0, max_sequence_length: int | None = None,
                offload_text: bool = False, device_gib: float | None = None, blocks=None,
                both: bool = True, fake_score: bool = False, gan: bool = False, ladd: bool = False,
                unrolled: int = 0, ema_target: bool = False) -> MemoryPlan:
    """Per-device bytes of distilling ``plan``'s student from ``model`` (see the module docstring); an
    ``arch:NAME`` model may be cut to ``blocks`` units per group. ``both``: trace the activations with and without
    gradient checkpointing (else only the configured setting, unless the plan does not fit). ``fake_score``: DMD2's
    trainable copy of the teacher, whole on every process in fp32 with its gradients and AdamW's two states, and
    the activations of its denoising step, which runs while the student's graph is held (fp32, never
    checkpointed). ``gan``: DMD2's GAN head, whose step adds a pass on real latents (the student's backward
    through the fake score then holds one pass, fewer than that step's two). ``ladd``: LADD's discriminator, the
    frozen teacher's pass on the student's samples held for the student's backward (fp32 activations, never
    checkpointed), and its heads in fp32 with gradients and AdamW's two states. ``unrolled``: student passes whose
    graphs are held beside the training pass's (direct distillation's sampler beyond its first step, or DMD1's
    regression through a ``K``-step sampler), each as large as the training pass's activations. ``ema_target``:
    consistency distillation's EMA target network, a copy of the student in fp32."""
    from slimdit.models.arch import arch_spec, is_arch, scheduler_config

    if frozen_dtype not in DTYPE_BYTES:
        raise ValueError(f"frozen dtype {frozen_dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    comps = component_configs(model)
    if "transformer" not in comps:
        raise ValueError(f"{model} has no transformer component to plan for")
    if blocks is not None:
        if not is_arch(model):
            raise ValueError("blocks cuts only arch:NAME models")
        from slimdit.models.arch import block_overrides

        cls, config = comps["transformer"]
        comps["transformer"] = (cls, {**config, **block_overrides(arch_spec(model), blocks)})
    with torch.device("meta"):
        built = {k: build_component(*v) for k, v in comps.items()}
    teacher = built["transformer"]
    vae_scale = vae_scale_of(built.get("vae"))
    if is_arch(model):
        sched = scheduler_config(model)
        spec = arch_spec(model)
        res, seq = resolution or spec.resolution, max_sequence_length or spec.max_sequence_length
    else:
        from slimdit.pipelines.loading import resolve_model_dir, sampling_defaults

        sched = json.loads(read_model_file(resolve_model_dir(model), "scheduler/scheduler_config.json"))
        defaults = sampling_defaults(model)
        res = resolution or defaults.get("height") or vae_scale * teacher.config.get("sample_size", 64)
        seq = max_sequence_length or defaults["max_sequence_length"]
    adapter = adapter_for(teacher, sched)
    validate(adapter, teacher, plan)
    removed = {o.unit for o in plan.ops if o.op == "remove"}
    counts = {g: sum(1 for u in adapter.units(teacher) if u.startswith(g + ".") and u not in removed)
              for g in adapter.groups}
    fb, sb = DTYPE_BYTES[frozen_dtype], DTYPE_BYTES[student_dtype]
    n = max(processes, 1)
    if n == 1:  # over one process the trainer shards nothing (and offloads nothing)
        sharding, offload_optimizer = "none", False
    # what each kind of sharding divides by the processes: FSDP everything; ZeRO-2 the student's gradients and
    # optimizer states; ZeRO-3 the student's weights too (the teacher stays whole: it is not DeepSpeed's)
    div_teacher = n if sharding == "fsdp" else 1
    div_weights = n if sharding in ("fsdp", "zero3") else 1
    div_states = n if sharding != "none" else 1
    params = {k: param_count(m) for k, m in built.items()}
    shapes = _student_shapes(adapter, teacher, plan)
    n_student = sum(numel(sh) for sh in shapes)
    act_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        "bf16" if student_dtype == "bf16" else mixed_precision, torch.float32)
    cls, config = comps["transformer"]
    def traced(ck: bool) -> int:
        return activation_bytes(cls, config, adapter, counts, model, sched, batch_size, res, seq, kd, act_dtype, ck,
                                vae_scale)

    acts = {checkpointing: traced(checkpointing)}
    grads = sb * n_student // div_states
    states = optimizer_bytes(shapes, optimizer) * sb // 4 // div_states  # in the weights' dtype, as torch keeps them
    items = {"teacher": params["transformer"] * fb // div_teacher,
             "student weights": sb * n_student // div_weights,
             "optimizer states": 0 if offload_optimizer else states,
             # the backward's peak of activations and the gradients made by then, or all gradients at its end
             "activations, gradients": max(acts[checkpointing], grads)}
    host = {}
    if sharding.startswith("zero"):  # ZeRO keeps an fp32 copy of its partition of the weights beside the states
        if offload_optimizer:
            host["optimizer states and fp32 weights (ZeRO offload)"] = states + 4 * n_student // n
        else:
            items["fp32 weight partition (ZeRO)"] = 4 * n_student // n
    if sharding in ("fsdp", "zero3") and n > 1:  # a whole unit gathered to run it, the next one prefetched
        unit = max(adapter.unit_params(teacher, u) for u in adapter.units(teacher))
        per = fb + 2 * sb if sharding == "fsdp" else 2 * sb  # (the teacher's,) the student's and its gradient's
        items[f"gathered units ({'FSDP' if sharding == 'fsdp' else 'ZeRO-3'})"] = 2 * unit * per
    if fake_score or ladd:  # one pass of the whole teacher (or its copy), fp32, never checkpointed
        whole = {g: sum(1 for u in adapter.units(teacher) if u.startswith(g + ".")) for g in adapter.groups}
        one = activation_bytes(cls, config, adapter, whole, model, sched, batch_size, res, seq, "standard",
                               torch.float32, False, vae_scale)
    if fake_score:
        items["DMD fake score"] = 16 * params["transformer"]  # fp32 weights and gradients, AdamW's two states
        items["DMD fake score's step"] = one * (2 if gan else 1)
    if ladd:
        from slimdit.distill.ladd import HEAD_WIDTH

        items["LADD teacher pass"] = one
        width = _image_width(teacher)
        hidden = min(width, HEAD_WIDTH)
        items["LADD heads"] = 16 * len(adapter.units(teacher)) * (2 * width + width * hidden + 2 * hidden + 1)
    if ema_target:
        items["consistency EMA target"] = 4 * params["transformer"]  # fp32 weights, no gradients
    if unrolled:
        items["unrolled student passes"] = unrolled * acts[checkpointing]
    others = {k: v for k, v in params.items() if k != "transformer"}
    if not offload_text:
        items["text encoders and VAE"] = sum(others.values()) * fb
    cond_dim = teacher.config.get("caption_channels") or teacher.config.get("joint_attention_dim") or 0
    if captions:
        host["conditioning cache"] = captions * seq * cond_dim * 4 * 2  # caption + null, fp32
    mp = MemoryPlan(model, processes, sharding, batch_size, res, checkpointing, items, {
        ("checkpointed" if k else "plain"): v for k, v in acts.items()}, host, {**params, "student": n_student},
        device_gib)
    if mp.fits is False or both:  # the other setting too: what checkpointing would change
        mp.activations[("plain" if checkpointing else "checkpointed")] = traced(not checkpointing)
    if mp.fits is False:
        mp.fixes = _fixes(mp, frozen_dtype, mixed_precision, sharding, offload_optimizer, offload_text,
                          student_dtype)
    return mp


def _student_shapes(adapter, teacher: nn.Module, plan: Plan) -> list[tuple[int, ...]]:
    """The shapes of the plan's student's parameters, from the teacher's (meta device): removed units dropped,
    each factored layer's weight as its two factors."""
    removed = {o.unit for o in plan.ops if o.op == "remove"}
    skip = {f"{adapter.groups[u.partition('.')[0]][0]}.{u.partition('.')[2]}." for u in removed}
    factored = {}
    for op in plan.ops:
        if op.op == "svd" and op.unit not in removed:
            attr = adapter.groups[op.unit.partition(".")[0]][0]
            for _unit, path, layer, k in list(svd_layers(adapter, teacher, op)):
                factored[f"{attr}.{op.unit.partition('.')[2]}.{path}.weight"] = (layer.weight.shape, k)
    shapes = []
    for name, p in teacher.named_parameters():
        if any(name.startswith(s) for s in skip):
            continue
        if name in factored:
            (n, m), k = factored[name]
            shapes += [(k, m), (n, k)]
        else:
            shapes.append(tuple(p.shape))
    return shapes


def _fixes(mp: MemoryPlan, frozen_dtype: str, mixed_precision: str, sharding: str, offload_optimizer: bool,
           offload_text: bool, student_dtype: str = "fp32") -> list[str]:
    """What would bring the plan down, most effective first; those the trainer cannot do yet say so."""
    out = []
    a = mp.activations
    if not mp.checkpointing and a["plain"] > a.get("checkpointed", a["plain"]):
        out.append(f"train.gradient_checkpointing: true (activations {a['plain'] / GIB:.1f} -> "
                   f"{a['checkpointed'] / GIB:.1f} GiB)")
    if mp.batch_size > 1:
        out.append("a smaller train.batch_size with train.grad_accum to keep the effective batch")
    if mixed_precision in ("no", "auto"):
        out.append("train.mixed_precision: bf16 on a GPU (activations in bf16)")
    if sharding == "none":
        out.append("train.sharding: fsdp with optimizer: adamw, over N processes (accelerate launch --multi_gpu "
                   "--num_processes N): teacher, student, gradients and optimizer states divided by N (or zero2 / "
                   "zero3: DeepSpeed ZeRO for the student)")
    if sharding.startswith("zero") and not offload_optimizer:
        out.append("train.offload_optimizer: true (ZeRO keeps the optimizer states and step in host memory)")
    if frozen_dtype == "fp32":
        out.append("train.frozen_dtype: bf16 (teacher, text encoders and VAE at 2 bytes a weight)")
    if student_dtype == "fp32":
        out.append("train.student_dtype: bf16 (student weights, gradients and optimizer states at half the bytes; "
                   "less exact than fp32 master weights)")
    if not offload_text:
        out.append("text encoders and VAE off the device once the caches are filled (slimdit distill does this)")
    return out


# ---- the measurement the plan is checked against ---------------------------------------------------------------
def measure_step_peak(model: str, plan: Plan, batch_size: int, resolution: int | None = None, *,
                      optimizer: str = "came", mixed_precision: str = "no", checkpointing: bool = False,
                      kd: str = "normalized_hybrid", max_sequence_length: int | None = None, steps: int = 2,
                      blocks=None) -> int:
    """Peak bytes of live tensors over ``steps`` real KD training steps on the host (teacher and student weights,
    gradients, optimizer states, activations), by torch's ``MemTracker``: what :func:`memory_plan` estimates
    without the text encoders and the VAE. ``model`` is ``arch:NAME`` (random weights, cut to ``blocks``) or a
    pipeline whose transformer is loaded. (:func:`slimdit.speed.step.measure_step` also times the step, on any
    device.)"""
    from torch.distributed._tools.mem_tracker import MemTracker

    from slimdit.speed.step import build_step

    step, _, teacher, student, opt = build_step(model, plan, batch_size, resolution, optimizer=optimizer,
                                                mixed_precision=mixed_precision, checkpointing=checkpointing,
                                                kd=kd, max_sequence_length=max_sequence_length, blocks=blocks)
    tracker = MemTracker()
    tracker.track_external(teacher, student, opt)
    with tracker:
        for _ in range(steps):
            step()
            tracker.reset_mod_stats()  # the per-module stats; the peak is kept
    return int(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])


# ---- the plan of a distillation config -------------------------------------------------------------------------
def device_gib(device: str) -> float | None:
    """Memory of ``device`` in GiB: a GPU's total, or the host's available memory for ``cpu``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def config_memory_plan(cfg, plan: Plan, device: str, captions: int = 0, processes: int = 1,
                       both: bool = False) -> MemoryPlan:
    """The memory plan of distillation config ``cfg`` (a :class:`slimdit.config.DistillConfig`, or a few-step
    :class:`slimdit.distill.fewstep.StepsConfig`, whose student has the teacher's size, whose ``dmd2`` rounds add
    the fake score and ``ladd`` rounds the discriminator) on ``device``: its teacher, plan, micro-batch, precision,
    checkpointing and processes, before any model loads."""
    from slimdit.distill.trainer import _mixed_precision
    from slimdit.models.precision import DTYPES, frozen_dtype

    t = cfg.train
    micro = max(1, t.batch_size // (processes * t.grad_accum))
    mp = _mixed_precision(t.mixed_precision) if device.startswith("cuda") else "no"
    frozen = {v: k for k, v in DTYPES.items()}[frozen_dtype(t.frozen_dtype, device)]
    return memory_plan(cfg.teacher, plan, micro, cfg.data.image_size, frozen_dtype=frozen,
                       student_dtype=t.student_dtype, mixed_precision=mp, optimizer=t.optimizer,
                       checkpointing=t.gradient_checkpointing, processes=processes, sharding=t.sharding,
                       offload_optimizer=t.offload_optimizer,
                       kd=t.kd, captions=captions, max_sequence_length=cfg.data.max_sequence_length,
                       offload_text=True, device_gib=device_gib(device), both=both,
                       fake_score="dmd2" in _step_methods(cfg), gan=bool(getattr(cfg, "gan_weight", 0)),
                       ladd="ladd" in _step_methods(cfg), unrolled=_unrolled(cfg),
                       ema_target="consistency" in _step_methods(cfg) and getattr(cfg, "target_ema", None) is not None)


def _unrolled(cfg) -> int:
    """Student passes a few-step config holds beyond the training pass: direct distillation's sampler beyond its
    first step; a DMD2 round's regression onto the teacher's pairs (DMD1) all of its steps."""
    steps, methods = getattr(cfg, "steps", 1), _step_methods(cfg)
    return (steps - 1 if "direct" in methods else 0) + (steps if getattr(cfg, "regression_weight", 0) else 0)


def _step_methods(cfg) -> set[str]:
    """The step-distillation methods a config's rounds use (none for a compression config)."""
    refine = getattr(cfg, "refine", None)
    return {getattr(cfg, "method", None)} | ({refine.method} if refine is not None else set())


def _image_width(teacher) -> int:
    """The width of a transformer's image stream (its blocks' hidden size)."""
    c = teacher.config
    return int(c.get("num_attention_heads") * c.get("attention_head_dim"))
