"""``slimdit compress`` and ``slimdit export --merge``: make a student from a model and a plan, on disk."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch.nn as nn

from slimdit.compress.plan import Plan, PlanRecord, apply_plan, validate
from slimdit.io import ensure_writable, write_json
from slimdit.models import adapter_for
from slimdit.models.storage import merge_lowrank, meta_model
from slimdit.pipelines.loading import (
    load_pipeline,
    resolve_model_dir,
    resolve_transformer,
    sampling_defaults,
    save_pipeline_with,
    save_student,
    split_model,
)


def format_record(record: PlanRecord) -> str:
    """A table of parameters per unit, before and after."""
    lines = [f"{'unit':<12}{'op':<8}{'before':>12}{'after':>12}{'kept':>8}"]
    for u in record.units:
        lines.append(f"{u.unit:<12}{u.op:<8}{u.params_before:>12,}{u.params_after:>12,}"
                     f"{u.params_after / u.params_before:>8.1%}")
    lines.append(f"{'all units':<20}{record.block_params_before:>12,}{record.block_params_after:>12,}"
                 f"{record.block_params_after / record.block_params_before:>8.1%}")
    return "\n".join(lines)


def as_plan(plan: Plan | dict | str | Path) -> Plan:
    """A plan given as a :class:`Plan`, its dict (``{"units": ...}``) or a YAML/JSON file."""
    if isinstance(plan, Plan):
        return plan
    return Plan.from_dict(plan) if isinstance(plan, dict) else Plan.load(plan)


def _cached_dir(repo: str, files: tuple[str, ...]) -> Path | None:
    """The folder in the local Hugging Face cache that holds the first of ``files`` of hub repo ``repo``."""
    from huggingface_hub import try_to_load_from_cache

    for f in files:
        try:
            path = try_to_load_from_cache(repo, f)
        except ValueError:  # not a valid repo id: loading it reports that
            return None
        if isinstance(path, str):
            return Path(path).parent
    return None


def transformer_skeleton(model: str) -> nn.Module | None:
    """``model``'s transformer built from its config alone on the meta device (no weights read), or None where that
    config is not on this machine (a hub id not in the cache). An unknown model fails here as it would when loaded."""
    _, transformer = split_model(model)
    if transformer is not None:  # PIPELINE#transformer=...: the transformer's own folder or repo
        src = resolve_transformer(transformer)
        d = src if isinstance(src, Path) else _cached_dir(src, ("config.json", "transformer/config.json"))
    else:
        src = resolve_model_dir(model)
        d = src / "transformer" if isinstance(src, Path) else _cached_dir(src, ("transformer/config.json",))
    return meta_model(d) if d is not None and (d / "config.json").exists() else None


def check_plan(model: str, plan: Plan) -> None:
    """Check ``plan``'s units, parts and ratios against ``model``'s transformer config before any weights load, so
    that a plan naming ``block.99`` or a misspelt part fails in a second, naming the unit. A model whose config is
    not on this machine is checked once loaded (by :func:`slimdit.compress.plan.validate`)."""
    skeleton = transformer_skeleton(model)
    if skeleton is not None:
        validate(adapter_for(skeleton), skeleton, plan)


def grasp_calibration(pipe, model: str, data: str):
    """The cached conditioning (:class:`slimdit.distill.trainer.Conditioning`) of caption-image set ``data``
    through ``pipe``'s encoders, made in a temporary folder: GRASP's calibration set for ``slimdit compress``."""
    from slimdit.data.cache import cached_conditioning, in_memory
    from slimdit.data.datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="slimdit-grasp-") as tmp:  # read whole before the folder goes
        return in_memory(cached_conditioning(pipe, model, load_dataset(data), tmp,
                                             sampling_defaults(model)["max_sequence_length"]))


def compress_to_dir(model: str, plan: Plan | dict | str | Path, out: str | Path | None, dry_run: bool = False,
                    device: str | None = None) -> PlanRecord:
    """Apply ``plan`` to ``model``'s transformer; write the student pipeline, ``plan.json`` and a model card
    (``README.md``) to ``out``. ``plan`` is a :class:`Plan`, its dict or a plan file."""
    plan = as_plan(plan)
    if not dry_run and out is None:
        raise ValueError("give --out (or --dry-run)")
    if plan.grasp is not None and plan.grasp.data is None and not dry_run:
        raise ValueError("plan grasp.data: slimdit compress has no training set to calibrate GRASP on; name one "
                         "(e.g. grasp: {data: 'shapes-train:200'}) or use slimdit distill, which calibrates on its "
                         "data.real")
    check_plan(model, plan)
    if not dry_run:
        ensure_writable(out, "compress --out")
    pipe = load_pipeline(model, device)
    adapter = adapter_for(pipe.transformer, pipe.scheduler.config)
    validate(adapter, pipe.transformer, plan)
    student = pipe.transformer
    keep = None
    if plan.grasp is not None and not dry_run:  # the choice of singular values does not change any count
        from slimdit.compress.grasp import grasp_from_data

        keep = grasp_from_data(adapter, student, plan, grasp_calibration(pipe, model, plan.grasp.data))
    record = apply_plan(adapter, student, plan, keep=keep)
    if not dry_run:
        from slimdit.reports.card import write_card

        save_student(student, out, base=model)
        write_json(Path(out) / "plan.json", {"teacher": model, "plan": plan.to_dict(), "record": record.to_json()})
        write_card(out, out, teacher=model)
    return record


def export_student(model: str, out: str | Path, merge: bool = False, full: bool = False,
                   device: str | None = None) -> Path:
    """Export a student: ``merge`` multiplies its low-rank layers back into dense ones; ``full`` writes a standalone
    pipeline (the base pipeline's text encoders, VAE and scheduler copied beside the transformer). Both together
    give what plain diffusers loads. The copy carries a model card made from the student's run records."""
    from slimdit.reports.card import write_card
    from slimdit.reports.run_facts import run_of

    if not (merge or full):
        raise ValueError("export needs --merge (dense layers), --full (a standalone pipeline) or both")
    ensure_writable(out, "export --out")
    pipe = load_pipeline(model, device)
    transformer = merge_lowrank(pipe.transformer) if merge else pipe.transformer
    if full:
        saved = save_pipeline_with(pipe, transformer, out, source=model)
    else:
        own = (Path(model) / "scheduler").is_dir()  # a few-step student's sampler goes with it
        saved = save_student(transformer, out, base=model, scheduler=pipe.scheduler if own else None)
    src = Path(model) if Path(model).is_dir() else None  # the student's folder, for its run's records
    write_card(saved, run_of(src) if src is not None else None, merged_from=model if merge else None,
               merged_block_params=adapter_for(transformer).block_params(transformer) if merge else None)
    return saved
