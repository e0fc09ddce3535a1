"""``slimdit compress`` and ``slimdit export --merge``: make a student from a model and a plan, on disk."""

from __future__ import annotations

from pathlib import Path

from slimdit.compress.plan import Plan, PlanRecord, apply_plan, validate
from slimdit.io import ensure_writable, write_json
from slimdit.models import adapter_for
from slimdit.models.storage import merge_lowrank
from slimdit.pipelines.loading import load_pipeline, save_pipeline_with


def format_record(record: PlanRecord) -> str:
    """A table of parameters per unit, before and after."""
    lines = [f"{'unit':<12}{'op':<8}{'before':>12}{'after':>12}{'kept':>8}"]
    for u in record.units:
        lines.append(f"{u.unit:<12}{u.op:<8}{u.params_before:>12,}{u.params_after:>12,}"
                     f"{u.params_after / u.params_before:>8.1%}")
    lines.append(f"{'all units':<20}{record.block_params_before:>12,}{record.block_params_after:>12,}"
                 f"{record.block_params_after / record.block_params_before:>8.1%}")
    return "\n".join(lines)


def compress_to_dir(model: str, plan: Plan, out: str | Path | None, dry_run: bool = False,
                    device: str | None = None) -> PlanRecord:
    """Apply ``plan`` to ``model``'s transformer; write the student pipeline and ``plan.json`` to ``out``."""
    if not dry_run and out is None:
        raise ValueError("give --out (or --dry-run)")
    if not dry_run:
        ensure_writable(out, "compress --out")
    pipe = load_pipeline(model, device)
    adapter = adapter_for(pipe.transformer, pipe.scheduler.config)
    validate(adapter, pipe.transformer, plan)
    student = pipe.transformer
    record = apply_plan(adapter, student, plan)
    if not dry_run:
        save_pipeline_with(pipe, student, out, source=model)
        write_json(Path(out) / "plan.json", {"plan": plan.to_dict(), "record": record.to_json()})
    return record


def export_merged(model: str, out: str | Path, device: str | None = None) -> Path:
    """Write a dense copy of a (low-rank) student pipeline that plain diffusers loads."""
    ensure_writable(out, "export --out")
    pipe = load_pipeline(model, device)
    return save_pipeline_with(pipe, merge_lowrank(pipe.transformer), out, source=model)
