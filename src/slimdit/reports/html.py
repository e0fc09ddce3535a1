"""The run report: one self-contained HTML page rebuilt from a run directory's files."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from slimdit.io import atomic_write_text, read_json
from slimdit.reports.run_facts import mixed_scorers
from slimdit.reports.training import plot_training

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{image-rendering:pixelated;max-width:100%}
.note{color:#555;font-size:90%}
.warn{color:#a00;font-weight:bold}"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def metric_table(rows: dict[str, dict], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model", *keys])
    body = "".join("<tr>" + f"<td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in keys)
                   + "</tr>" for name, m in rows.items())
    return f"<table><tr>{head}</tr>{body}</table>"


def stage_table(stages: list[dict]) -> str:
    keys = ["units", "block_params", "block_param_ratio", "latency_ratio", "overall", "fid", "cmmd"]
    head = "".join(f"<th>{k}</th>" for k in ["stage", *keys])
    body = "".join("<tr>" + f"<td>{r['stage']}</td>" + "".join(
        f"<td>{_fmt(', '.join(r[k]) if k == 'units' else r.get(k, ''))}</td>" for k in keys) + "</tr>"
        for r in stages)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` for a run directory from its files: ``summary.json``, ``metrics/*.json``,
    ``analysis/`` plots, stage tables and ``*.png`` grids."""
    run = Path(run_dir)
    summary = read_json(run / "summary.json")
    rows = {p.stem: read_json(p) for p in sorted((run / "metrics").glob("*.json"))}
    keys = ["overall", "single_object", "two_object", "counting", "colors", "position", "color_attr", "fid", "cmmd",
            "clip_score", "n_images"]
    parts = [f"<h1>slimdit run: {html.escape(run.name)}</h1>",
             f"<p class='note'>{html.escape(summary.get('description', ''))}</p>"]
    if mixed := mixed_scorers(list(rows.values())):
        parts.append(f"<p class='warn'>{html.escape(mixed)}</p>")
    if rows:
        parts += ["<h2>shapes-geneval</h2>", metric_table(rows, keys),
                  "<p class='note'>Accuracy per category (an image counts when the detector finds exactly the "
                  "prompt's objects); overall = mean over categories. FID and CMMD against ground-truth renders of "
                  "the same prompts, through the shapes embedder; lower is better.</p>"]
    if summary.get("stages"):
        parts += [f"<h2>Stages ({html.escape(str(summary.get('schedule', '')))})</h2>", stage_table(summary["stages"]),
                  "<p class='note'>Per stage: units modified, block parameters after it (and as a fraction of the "
                  "teacher's), and the student's evaluation after retraining.</p>"]
    if plot_training(run, run / "training.png") is not None:
        parts += ["<h2>Training</h2>", _img(run / "training.png"),
                  "<p class='note'>Top: the KD loss of every phase, in the order they ran. Bottom: the trajectory "
                  "MSE, the student's output against the teacher's on the teacher's own sampling of a few "
                  "captions; falling means the student is becoming its teacher.</p>"]
    for plot in sorted((run / "analysis" / "plots").glob("*.png")):
        parts += [f"<h2>analysis: {html.escape(plot.stem)}</h2>", _img(plot)]
    if (run / "analysis" / "sensitivity.png").exists():
        parts += ["<h2>analysis: one image per modified unit</h2>", _img(run / "analysis" / "sensitivity.png")]
    for grid in sorted(run.glob("grid_*.png")):
        parts += [f"<h2>{html.escape(grid.stem.removeprefix('grid_'))}</h2>", _img(grid),
                  "<p class='note'>One row per prompt, four seeds; frame green when the prompt holds.</p>"]
        captions = grid.with_suffix(".txt")
        if captions.exists():
            items = "".join(f"<li>{html.escape(line)}</li>" for line in captions.read_text().splitlines())
            parts.append(f"<ol>{items}</ol>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>slimdit {html.escape(run.name)}</title>" \
           f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    atomic_write_text(run / "report.html", page)
    return run / "report.html"
