"""Training curves of a run directory: the KD loss and the trajectory MSE (``val_traj_mse``) of every phase, in
the order they ran, drawn from the phases' ``metrics.jsonl`` alone."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(run_dir: str | Path) -> list[tuple[str, list[dict]]]:
    """``(phase name, logged rows)`` for every phase of a distill run (``phases/*``) or a schedule
    (``stages/*/phases/*``), in the order they ran."""
    run = Path(run_dir)
    files = sorted(run.glob("stages/*/phases/*/metrics.jsonl")) or sorted(run.glob("phases/*/metrics.jsonl"))
    out = []
    for f in files:
        name = f.parent.name if f.parent.parent.parent == run else f"stage {f.parents[2].name} {f.parent.name}"
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out.append((name, rows))
    return out


def plot_training(run_dir: str | Path, out: str | Path) -> Path | None:
    """Loss (top) and trajectory MSE (bottom, log scale) over the run's steps, phases one after another."""
    curves = training_curves(run_dir)
    if not curves:
        return None
    has_val = any("val_traj_mse" in r for _, rows in curves for r in rows)
    fig, axes = plt.subplots(2 if has_val else 1, 1, figsize=(8, 5 if has_val else 3), sharex=True, squeeze=False)
    ax_loss, ax_val = axes[0, 0], axes[-1, 0]
    offset = 0
    for i, (name, rows) in enumerate(curves):
        loss = [(offset + r["step"], r["total"]) for r in rows if "total" in r]
        val = [(offset + r["step"], r["val_traj_mse"]) for r in rows if "val_traj_mse" in r]
        if loss:
            ax_loss.plot(*zip(*loss), color=f"C{i % 10}", lw=1, label=name)
        if val:
            ax_val.plot(*zip(*val), "o-", color=f"C{i % 10}", ms=3)
        offset += max(r["step"] for r in rows)
        for ax in {ax_loss, ax_val}:
            ax.axvline(offset, color="0.8", lw=0.8)
    ax_loss.set_ylabel("KD loss (total)")
    if has_val:
        ax_val.set_ylabel("trajectory MSE vs teacher")
        ax_val.set_yscale("log")
    ax_val.set_xlabel("training step (phases in order)")
    ax_loss.legend(fontsize=7, ncol=2)
    for ax in {ax_loss, ax_val}:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
