"""``slimdit sweep SWEEP.yaml``: one base config, a grid of overrides, one run directory per grid point.

A sweep file::

    kind: distill            # distill (slimdit distill) | run (slimdit run, a schedule)
    out: runs/removal-vs-svd
    base: configs/distill-shapes.yaml   # a file, or the config inline (its own ``out`` is replaced)
    set: {eval.limit: 120}              # overrides for every point (optional)
    grid:                               # dotted keys -> values; every combination is one run
      plan: [configs/plans/shapes-remove-middle4.yaml, configs/plans/shapes-svd-middle8.yaml]
      train.kd: [output, standard, hybrid, normalized, normalized_hybrid]

A grid value may also be a named group of overrides that vary together, e.g. equal training budgets::

    grid:
      schedule: [{name: one_shot, schedule.kind: one_shot, train.steps: 400},
                 {name: progressive, schedule.kind: progressive, schedule.stages: 2, train.steps: 200}]

Every point's config is validated before the first run starts. Runs go to ``out/<point>/`` and are resumable,
so rerunning the sweep continues the unfinished ones; a finished point is kept only while its config and inputs are
unchanged (a changed base, ``set`` or plan file is refused, naming what changed, before anything runs), and two
points with one name are refused. ``results.json`` and ``results.md`` collect each
point's summary, and ``results.png`` plots the student's shapes-geneval overall against the block-parameter
ratio (one line per combination of the other grid keys) or, when all points have one size, as bars.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from slimdit.config import DistillConfig, RunConfig, _Strict, load_config, read_config_file, resolve_inputs
from slimdit.io import atomic_write_text, read_json, write_json


class SweepConfig(_Strict):
    kind: Literal["distill", "run"] = "distill"
    out: Path
    base: str | dict[str, Any]
    set: dict[str, Any] = {}
    grid: dict[str, list[Any]] = Field(min_length=1)


def _slug(value: Any) -> str:
    if isinstance(value, dict):
        value = value["name"]
    s = Path(value).stem if isinstance(value, str) and value.endswith((".yaml", ".yml", ".json")) else str(value)
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in s)


def _combos(cfg: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, {grid key: value})`` for every combination of the grid, in order; the one place points are named."""
    for k, values in cfg.grid.items():
        if not values:
            raise ValueError(f"grid.{k} is empty")
        for v in values:
            if isinstance(v, dict) and not isinstance(v.get("name"), str):
                raise ValueError(f"grid.{k}: a group of overrides needs a name, got {v}")
    combos = [("__".join(_slug(v) for v in combo), dict(zip(cfg.grid, combo)))
              for combo in itertools.product(*cfg.grid.values())]
    seen: dict[str, dict[str, Any]] = {}
    for name, combo in combos:
        if name in seen:  # one run directory for two points: the second would be read as the first's result
            raise ValueError(f"grid points {seen[name]} and {combo} are both named {name!r} (a file's name without "
                             "its folder and suffix, or a group's name): rename one")
        seen[name] = combo
    return combos


def points(cfg: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, overrides)`` for every combination of the grid, in order."""
    out = []
    for name, combo in _combos(cfg):
        overrides = dict(cfg.set)
        for k, v in combo.items():
            overrides.update({kk: vv for kk, vv in v.items() if kk != "name"} if isinstance(v, dict) else {k: v})
        out.append((name, overrides))
    return out


def grid_values(cfg: SweepConfig, name: str) -> dict[str, Any]:
    """The grid coordinates of point ``name``: each key's value (a group's name for a group of overrides)."""
    for n, combo in _combos(cfg):
        if n == name:
            return {k: v["name"] if isinstance(v, dict) else v for k, v in combo.items()}
    raise KeyError(name)


def load_sweep(path: str | Path) -> tuple[SweepConfig, list[tuple[str, Any]]]:
    """Load a sweep and validate every point's config (errors name the point and the field)."""
    sweep = load_config(path, SweepConfig)  # its base is resolved against the sweep file's folder
    base = sweep.base
    if isinstance(base, str):
        if not Path(base).exists():
            raise FileNotFoundError(f"sweep base {base} does not exist")
        base = read_config_file(base)
    model = DistillConfig if sweep.kind == "distill" else RunConfig
    configs = []
    for name, overrides in points(sweep):
        overrides = resolve_inputs(overrides, Path(path).parent, dotted=True)  # paths in the sweep file
        raw = {**base, "out": str(sweep.out / name)}
        try:
            configs.append((name, load_config(raw, model, overrides)))
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
    return sweep, configs


def run_sweep(path: str | Path, progress: bool = True) -> Path:
    sweep, configs = load_sweep(path)
    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.out / "sweep.yaml", yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    if sweep.kind == "distill":
        from slimdit.distill.run import run_distill as runner
    else:
        from slimdit.schedules.run import run_schedule as runner
    from slimdit.identity import check_run_dir, input_fingerprints

    for _name, cfg in configs:  # a finished point is skipped only if it was made from today's config and inputs
        if (Path(cfg.out) / "summary.json").exists():
            check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    for _name, cfg in configs:
        if not _finished(cfg):  # a finished point scored by another scorer resumes: scored again, not retrained
            runner(cfg, progress=progress)
        collect(sweep.out)
    return sweep.out


def _finished(cfg) -> bool:
    """Whether a point is done: summarised, and every evaluation it saved scored as its benchmark scores now."""
    from slimdit.metrics.evaluate import saved_metrics

    run = Path(cfg.out)
    if not (run / "summary.json").exists():
        return False
    if not cfg.eval.benchmark:
        return True
    saved = [*run.glob("metrics/*.json"), *run.glob("stages/*/eval.json")]
    return all(saved_metrics(f, cfg.eval.benchmark) is not None for f in saved)


def collect(out: str | Path) -> list[dict]:
    """Gather the finished points of a sweep into ``results.json`` and a Markdown table ``results.md``."""
    out = Path(out)
    sweep = SweepConfig.model_validate(yaml.safe_load((out / "sweep.yaml").read_text()))
    rows = []
    for name, _ in _combos(sweep):
        summary = out / name / "summary.json"
        if summary.exists():
            rows.append({"point": name, "grid": grid_values(sweep, name), **read_json(summary)})
    write_json(out / "results.json", rows)
    atomic_write_text(out / "results.md", results_table(rows, list(sweep.grid)))
    if rows:
        plot_results(rows, list(sweep.grid), out / "results.png")
    return rows


def _size_key(rows: list[dict], grid_keys: list[str]) -> str | None:
    """The grid key that sets the model's size, if one does: a numeric key whose points differ in size."""
    for k in grid_keys:
        if all(isinstance(r["grid"][k], (int, float)) for r in rows) and len({r["grid"][k] for r in rows}) > 1:
            return k
    return None


def series(rows: list[dict], grid_keys: list[str], metric: str = "student.overall") -> dict[str, list[tuple]]:
    """``label -> [(x, y), ...]`` sorted by x: x is the block-parameter ratio reached (else the size key's value),
    y the ``metric`` of ``_flat``; one label per combination of the grid keys other than the size key. Without a
    size key, one series ``all`` with the point names as x."""
    size = _size_key(rows, grid_keys)
    out: dict[str, list[tuple]] = {}
    for r in rows:
        f = _flat(r)
        if metric not in f:
            continue
        if size is None:
            out.setdefault("all", []).append((r["point"], f[metric]))
            continue
        label = ", ".join(_slug(r["grid"][k]) for k in grid_keys if k != size) or metric
        x = f.get("block_param_ratio", r["grid"][size])
        out.setdefault(label, []).append((x, f[metric]))
    return {k: v if size is None else sorted(v) for k, v in out.items()}


PANELS = (("overall", "shapes-geneval overall"), ("fid", "FID"), ("cmmd", "CMMD"))


def plot_results(rows: list[dict], grid_keys: list[str], path: Path) -> None:
    """One panel per metric (overall, FID, CMMD) with the trained students, and the untrained ones where
    evaluated: lines over the block-parameter ratio for a sweep over sizes, else bars per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, title) for m, title in PANELS if series(rows, grid_keys, f"student.{m}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (m, title) in zip(axes[0], panels):
        student = series(rows, grid_keys, f"student.{m}")
        untrained = series(rows, grid_keys, f"untrained.{m}")
        if "all" in student:  # one size: bars per point, the untrained student as a tick
            names = [n for n, _ in student["all"]]
            ax.barh(range(len(names)), [y for _, y in student["all"]], color="C0", label="trained")
            pre = dict(untrained.get("all", []))
            if pre:
                ax.plot([pre.get(n, float("nan")) for n in names], range(len(names)), "k|", ms=14,
                        label="untrained")
            ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names), fontsize=7)
            ax.set_xlabel(title)
        else:
            for i, (label, pts) in enumerate(student.items()):
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=label)
                if label in untrained:
                    ax.plot(*zip(*untrained[label]), "x:", color=f"C{i}", alpha=0.6, label=f"{label} (untrained)")
            ax.set_xlabel("block parameters kept (ratio)")
            ax.set_ylabel(title + ("" if m == "overall" else " (lower is better)"))
            if m == "overall":
                ax.set_ylim(0, 1)  # the benchmark's own scale: small gaps stay small
            else:
                ax.set_ylim(bottom=0)
            ax.invert_xaxis()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flat(row: dict) -> dict[str, Any]:
    """The figures of one point: block-parameter ratio, and overall/FID/CMMD before and after training."""
    f: dict[str, Any] = {}
    bp = row.get("block_params")
    if isinstance(bp, dict):
        f["block_param_ratio"] = bp.get("ratio")
    if row.get("stages"):  # a schedule: its last stage is the student
        last = row["stages"][-1]
        f["stages"] = len(row["stages"])
        f["block_param_ratio"] = last.get("block_param_ratio")
        row = {**row, "student_metrics": {k: last[k] for k in ("overall", "fid", "cmmd") if k in last}}
    for who in ("untrained", "student"):
        m = row.get(f"{who}_metrics") or {}
        for k in ("overall", "fid", "cmmd"):
            if k in m:
                f[f"{who}.{k}"] = m[k]
    if "bench" in row:
        f["latency_ratio"] = row["bench"].get("latency_ratio")
        f["flop_ratio"] = row["bench"].get("flop_ratio")
    return f


def results_table(rows: list[dict], grid_keys: list[str]) -> str:
    flats = [_flat(r) for r in rows]
    cols = [c for c in dict.fromkeys(k for f in flats for k in f)]
    head = "| " + " | ".join([*grid_keys, *cols]) + " |\n|" + "---|" * (len(grid_keys) + len(cols)) + "\n"

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = "".join("| " + " | ".join([*(_slug(r["grid"][k]) for k in grid_keys),
                                      *(cell(f.get(c, "")) for c in cols)]) + " |\n" for r, f in zip(rows, flats))
    return head + body
