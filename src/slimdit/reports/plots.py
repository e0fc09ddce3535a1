"""Plots of an analysis, drawn from its ``scores.json`` alone (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slimdit.io import read_json  # noqa: E402


def tick_labels(units: list[str]) -> list[str]:
    """Short axis labels: a unit's number, after its group's initial when the units span groups (Flux's double
    and single blocks: d0 … d3, s0 … s7)."""
    parts = [u.rpartition(".") for u in units]
    if len({g for g, _, _ in parts}) < 2:
        return [n for _, _, n in parts]
    return [(g[:1] or "") + n for g, _, n in parts]


def _bars(ax, units, values, title, ylabel):
    ax.bar(range(len(units)), values, color="#4c72b0")
    ax.set_xticks(range(len(units)))
    ax.set_xticklabels(tick_labels(units), fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)


def plot_criteria(scores: dict, out: Path) -> Path:
    """Each criterion per unit beside the metric-based CMMD per unit (thesis figs. 5.2-5.5)."""
    units = scores["units"]
    agree = scores.get("agreement", {})

    def rho(c: str) -> str:
        return f"; Spearman vs CMMD {agree[c]['cmmd']:+.2f}" if c in agree else ""

    panels = []
    if "magnitude" in scores:
        panels.append((f"magnitude (eq. 4.2){rho('magnitude')}", [scores["magnitude"][u] for u in units], "||B_i||"))
    if "cka" in scores:
        panels.append((f"CKA importance 1 - mean CKA (eq. 4.3){rho('cka')}",
                       [scores["cka"]["importance"][u] for u in units], "1 - CKA"))
    if "io_mse" in scores:
        panels.append((f"input-output MSE (Flux.1 Lite){rho('io_mse')}", [scores["io_mse"][u] for u in units],
                       "MSE"))
    if "metric" in scores:
        panels.append(("CMMD with the unit modified", [scores["metric"][u]["cmmd"] for u in units], "CMMD"))
        panels.append(("CLIP score with the unit modified", [scores["metric"][u]["clip_score"] for u in units],
                       "CLIP score"))
        panels.append(("rank sum r_CMMD + r_CLIP (eq. 4.4)", [scores["metric"][u]["rank"] for u in units], "rank"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(units)), 1.9 * len(panels)), squeeze=False)
    for ax, (title, vals, ylabel) in zip(axes[:, 0], panels):
        _bars(ax, units, vals, title, ylabel)
    axes[-1, 0].set_xlabel("unit")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_cka_heatmap(scores: dict, out: Path, stream: str | None = None) -> Path:
    """CKA of each unit's input vs output at each sampling step (thesis fig. 6.1); ``stream``: another stream's
    (Flux's text stream) instead of the image stream's."""
    h = np.array((scores["cka"][stream] if stream else scores["cka"])["heatmap"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, max(3, 0.25 * h.shape[0])))
    im = ax.imshow(h, aspect="auto", cmap="viridis", vmin=np.nanmin(h), vmax=1.0)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("unit")
    ax.set_yticks(range(len(scores["units"])))
    ax.set_yticklabels(scores["units"], fontsize=7)
    fig.colorbar(im, ax=ax, label=f"linear CKA(input, output){f', {stream} stream' if stream else ''}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_feature_rms(scores: dict, out: Path) -> Path:
    """RMS of each unit's output features (thesis fig. 5.12)."""
    units = scores["units"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(units)), 2.5))
    _bars(ax, units, [scores["cka"]["feature_rms"][u] for u in units], "feature RMS per unit", "RMS")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_all(analysis_dir: str | Path) -> list[Path]:
    d = Path(analysis_dir)
    scores = read_json(d / "scores.json")
    (d / "plots").mkdir(exist_ok=True)
    paths = [plot_criteria(scores, d / "plots" / "criteria.png")]
    if "cka" in scores:
        paths += [plot_cka_heatmap(scores, d / "plots" / "cka_heatmap.png"),
                  plot_feature_rms(scores, d / "plots" / "feature_rms.png")]
        paths += [plot_cka_heatmap(scores, d / "plots" / f"cka_heatmap_{s}.png", s)
                  for s, v in scores["cka"].items() if isinstance(v, dict) and "heatmap" in v]
    return paths
