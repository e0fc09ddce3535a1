"""The slimdit command end to end on the shipped weights, and its errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from slimdit.cli import main
from slimdit.worlds.shapes.benchmark import select_prompts
from slimdit.worlds.shapes.prompts import CATEGORIES


def test_eval_oracle_writes_the_metrics_json(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", "shapes-oracle", "--benchmark", "shapes-geneval", "--limit", "24",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["overall"] >= 0.99 and all(m[c] >= 0.99 for c in CATEGORIES)
    assert m["n_images"] == 96 and m["fid"] >= 0 and m["cmmd"] >= 0


def test_limit_keeps_every_category_and_a_prefix_of_images():
    first = select_prompts(6)
    assert {p.category for p in first} == set(CATEGORIES)
    assert select_prompts(12)[:6] == first


def test_generate_writes_pngs_and_a_grid(tmp_path):
    assert main(["generate", "--model", "shapes-pixart", "--prompt", "a red circle", "--prompt", "two squares",
                 "--num-images", "2", "--steps", "4", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("image_*.png"))) == 4 and (tmp_path / "grid.png").exists()
    meta = json.loads((tmp_path / "prompts.json").read_text())
    assert [m["prompt"] for m in meta] == ["a red circle"] * 2 + ["two squares"] * 2
    from PIL import Image

    side = tmp_path / "vs-oracle"  # each prompt's row: the model's images, then the oracle's from the same seeds
    assert main(["generate", "--model", "shapes-pixart", "--vs", "shapes-oracle", "--prompt", "a red circle",
                 "--prompt", "two squares", "--num-images", "2", "--steps", "4", "--out", str(side)]) == 0
    assert (Image.open(side / "grid.png").size == (2 + 4 * (8 * 32 + 2), 2 + 2 * (8 * 32 + 2))
            and len(list((side / "vs").glob("image_*.png"))) == 4)
    assert all(np.array_equal(np.array(Image.open(tmp_path / m["file"])), np.array(Image.open(side / m["file"])))
               for m in meta)  # same prompts and seeds as the run without --vs


# the packaged demo at toy sizes: the same code path, seconds instead of minutes
TINY_DEMO = ["analysis.prompts=shapes-train:2:11", "analysis.steps=2", "calibration.prompts=shapes-train:2:7",
             "calibration.steps=2", "data.real=shapes-train:8", "data.synth_images=4", "train.steps=2",
             "train.batch_size=2", "train.warmup_steps=1", "train.val_prompts=2", "eval.limit=6",
             "eval.images_per_prompt=1", "eval.steps=2", "bench.repeats=1", "bench.batch_size=1"]


def test_demo_writes_summary_and_report(tmp_path):
    run = tmp_path / "demo"
    sets = [x for item in TINY_DEMO for x in ("--set", item)]
    assert main(["demo", "--out", str(run), *sets]) == 0
    s = json.loads((run / "summary.json").read_text())
    for who in ("teacher", "student"):
        assert {"shapes_geneval_overall", "fid", "cmmd", "block_params"} <= set(s[who])
        assert np.isfinite([s[who]["fid"], s[who]["cmmd"]]).all()
    assert s["student"]["block_params"] <= 0.6 * s["teacher"]["block_params"] + 1
    assert s["student"]["latency_ratio"] > 0 and len(s["stages"]) == 2
    assert all("latency_ratio" in r for r in s["stages"])
    assert (run / "analysis" / "scores.json").exists() and (run / "grid_2_student.png").exists()
    html = (run / "report.html").read_text()
    assert "Stages (linear_progressive)" in html and "data:image/png;base64" in html
    assert main(["demo", "--out", str(run), *sets]) == 2  # never overwrite a finished run
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").read_text() == html


@pytest.mark.slow  # the whole demo again, then the step rounds (each covered on its own by faster tests)
def test_demo_with_steps_makes_the_compressed_student_few_step(tmp_path):
    run = tmp_path / "demo"
    tiny_steps = ["fewstep.start=4", "fewstep.train.steps=2", "fewstep.train.batch_size=2",
                  "fewstep.train.warmup_steps=1", "fewstep.refine.steps=2"]
    sets = [x for item in TINY_DEMO + tiny_steps for x in ("--set", item)]
    assert main(["demo", "--out", str(run), "--steps", "2", *sets]) == 0
    s = json.loads((run / "summary.json").read_text())
    final, size = s["student"], s["size_student"]
    assert final["steps"] == 2 and final["block_param_ratio"] == size["block_param_ratio"] <= 0.6
    assert {"retained_overall", "latency_ratio", "flop_ratio", "shapes_geneval_overall"} <= set(final)
    assert final["flop_ratio"] < size["flop_ratio"] / 10  # 2 one-pass steps against 20 CFG steps
    # the halving, then the refining DMD2 round on the same steps, with the demo's fake score and its own EMA
    assert sorted(p.name for p in (run / "steps" / "rounds").iterdir()) == ["00_2steps", "01_2steps_dmd2"]
    saved = yaml.safe_load((run / "steps" / "config.yaml").read_text())
    assert (saved["fake_updates"], saved["fake_lr"], saved["refine"]["ema_decay"]) == (2, 1e-4, 0.99)
    assert saved["disc_lr"] is None and saved["train"]["ema_decay"] is None  # LADD's heads stay out; halvings: no EMA
    assert (run / "steps" / "student" / "scheduler").is_dir() and (run / "report.html").exists()


def test_demo_rejects_a_bad_field_before_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "schedule.target=1.5"]) == 2
    assert "schedule.target" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "shapes-oracle", "--limit", "0"], "--limit must be between 1 and 300"),
    (["eval", "--model", "shapes-oracle", "--embedder", "inception"], "unknown embedder"),
    (["generate", "--model", "shapes-oracle", "--prompt", "a purple hexagon", "--out", "/tmp/x"],
     "not a shapes-world prompt"),
])
def test_bad_input_gets_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_directory_that_is_not_a_pipeline_is_named(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "not a diffusers pipeline directory" in capsys.readouterr().err


def test_python_api_mirrors_the_cli():
    import slimdit
    import slimdit.compress
    import slimdit.distill
    from slimdit.compress.student import compress_to_dir
    from slimdit.distill.run import run_distill
    from slimdit.schedules.run import run_schedule

    assert slimdit.distill.distill is run_distill and slimdit.run is run_schedule
    assert slimdit.compress.compress is compress_to_dir
    for name in ("load_model", "load_pipeline", "analyze", "evaluate", "bench"):
        assert callable(getattr(slimdit, name)), name
