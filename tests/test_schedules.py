"""Linear progressive compression: eq. 4.15-4.21."""

from __future__ import annotations

import pytest

from slimdit.schedules.linear_progressive import auto_units, cmmd_per_removed_parameter, feasible_range, linear_ratios


def test_scores_are_cmmd_per_removed_parameter():
    s = cmmd_per_removed_parameter({"a": 0.2, "b": 0.2}, {"a": 100, "b": 200}, 0.5)
    assert s == {"a": 0.2 / 50, "b": 0.2 / 100}


def test_ratios_fall_linearly_and_remove_exactly_n():
    scores = {"block.0": 3.0, "block.1": 1.0, "block.2": 2.0, "block.3": 4.0}
    params = {"block.0": 100, "block.1": 200, "block.2": 100, "block.3": 300}
    r = linear_ratios(scores, params, n_remove=160, k=3, base=0.5)
    assert r.units == ["block.1", "block.2", "block.0"]
    # x = (S sum P - N) / sum P_i (i-1) = (0.5 * 400 - 160) / (0*200 + 1*100 + 2*100) = 40 / 300
    assert r.slope == pytest.approx(40 / 300)
    assert r.ratios == pytest.approx([0.5, 0.5 - 40 / 300, 0.5 - 80 / 300])
    assert r.removed == pytest.approx(160)


def test_infeasible_budget_states_the_range():
    params = {"a": 100, "b": 100, "c": 100}
    lo, hi = feasible_range([100, 100, 100], 0.5)
    assert (lo, hi) == (pytest.approx(150 - 0.5 * 300 / 2), pytest.approx(150))
    with pytest.raises(ValueError, match=r"N must lie in \[75, 150\]"):
        linear_ratios({"a": 1, "b": 2, "c": 3}, params, n_remove=200, k=3, base=0.5)
    with pytest.raises(ValueError, match="infeasible"):
        linear_ratios({"a": 1, "b": 2, "c": 3}, params, n_remove=50, k=3, base=0.5)
    at_edges = [linear_ratios({"a": 1, "b": 2, "c": 3}, params, n, 3, 0.5) for n in (lo, hi)]
    assert at_edges[0].ratios[-1] == pytest.approx(0) and at_edges[1].slope == pytest.approx(0)


def test_auto_units_puts_the_share_mid_range_where_a_fixed_k_cannot_fit():
    scores = {f"u{i}": float(i) for i in range(6)}
    equal = {u: 100 for u in scores}
    # k units of one size P take S P k / 2 .. S P k (eq. 4.21); N = 0.75 S P k is mid-range for k = 3, where the
    # ratios fall from S to S / 2
    k = auto_units(scores, equal, 0.75 * 0.6 * 100 * 3, 0.6)
    assert k == 3
    assert linear_ratios(scores, equal, 0.75 * 0.6 * 300, k, 0.6).ratios[-1] == pytest.approx(0.3)
    # two large least-important units (a Flux's double blocks before its single blocks): six units at S = 0.6
    # remove at least 504, more than the stage's share of 400, so k = 6 is infeasible. k = 2 allows 240..480 and
    # k = 3 360..540; 400 sits at 0.67 and 0.22 of those ranges, so auto takes k = 2 (nearer the middle)
    sizes = {"u0": 400, "u1": 400, "u2": 100, "u3": 100, "u4": 100, "u5": 100}
    n = 400
    assert feasible_range([sizes[u] for u in sorted(scores, key=scores.get)], 0.6)[0] == pytest.approx(504)
    k = auto_units(scores, sizes, n, 0.6)
    r = linear_ratios(scores, sizes, n, k, 0.6)
    assert k == 2 and r.removed == pytest.approx(n) and all(c >= 0 for c in r.ratios)
    assert auto_units(scores, sizes, 0.61 * sum(sizes.values()), 0.6) is None  # more than all units can give


def _cfg(teacher, out, **schedule):
    return {"teacher": teacher, "out": str(out), "schedule": schedule,
            "calibration": {"prompts": "shapes-train:4:7", "steps": 2},
            "protocol": [{"name": "all", "trainable": ["all"], "dataset": "real", "fraction": 1.0}],
            "data": {"real": "shapes-train:16"},
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "checkpoint_every": 1},
            "eval": {"limit": 6, "images_per_prompt": 1, "steps": 2}}


def test_linear_progressive_runs_in_stages_and_resumes(tiny_teacher, tmp_path):
    import json

    from slimdit.cli import main

    cfg = tmp_path / "lp.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(_cfg(tiny_teacher, tmp_path / "run", kind="linear_progressive", target=0.7,
                                       stages=2, units_per_stage=2, base_ratio=0.5, c_fixed=0.3)))
    assert main(["run", str(cfg)]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["stage"] for r in s["stages"]] == [0, 1]
    assert s["stages"][-1]["block_param_ratio"] < s["stages"][0]["block_param_ratio"] < 1
    assert 0.65 < s["stages"][-1]["block_param_ratio"] <= 0.7  # lands at the target, not above it
    sel = json.loads((tmp_path / "run" / "stages" / "00" / "selection.json").read_text())
    ratios = list(sel["ratios"].values())
    assert ratios == sorted(ratios, reverse=True)  # the least important unit is compressed most
    assert "<h2>Stages (linear_progressive)</h2>" in (tmp_path / "run" / "report.html").read_text()
    assert main(["run", str(cfg)]) == 0  # finished stages are loaded, not redone
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] == s["stages"]
    # a finished stage scored by another scorer (an older detector, say) is scored again, not trained again
    from slimdit.worlds.shapes.benchmark import scorer_digest

    stage = tmp_path / "run" / "stages" / "00"
    saved = json.loads((stage / "eval.json").read_text())
    assert saved["scored_by"] == scorer_digest()
    (stage / "eval.json").write_text(json.dumps({**saved, "scored_by": "an older detector", "overall": 2.0}))
    row = json.loads((stage / "metrics.json").read_text())
    (stage / "metrics.json").write_text(json.dumps({**row, "overall": 2.0}))
    trained = (stage / "done.json").stat().st_mtime_ns
    assert main(["run", str(cfg)]) == 0
    assert json.loads((stage / "eval.json").read_text()) == saved
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] == s["stages"]
    assert (stage / "done.json").stat().st_mtime_ns == trained


def test_one_shot_removal_and_progressive(tiny_teacher, tmp_path):
    from slimdit.schedules.run import run_schedule

    one = run_schedule(_cfg(tiny_teacher, tmp_path / "one", kind="one_shot", op="remove", target=0.5),
                       progress=False)
    import json

    s = json.loads((one / "summary.json").read_text())
    assert s["student_block_params"] <= 0.5 * s["teacher_block_params"] and len(s["stages"]) == 1
    prog = run_schedule(_cfg(tiny_teacher, tmp_path / "prog", kind="progressive", op="remove", target=0.5,
                             stages=3, cmmd_threshold=1e9), progress=False)
    s = json.loads((prog / "summary.json").read_text())
    assert s["student_block_params"] <= 0.5 * s["teacher_block_params"]
    # a trigger that always fires would remove one block per stage; the pace still reaches the target in 2 stages
    paced = run_schedule(_cfg(tiny_teacher, tmp_path / "paced", kind="progressive", op="remove", target=0.25,
                              stages=2, cmmd_threshold=1e-12), progress=False)
    s = json.loads((paced / "summary.json").read_text())
    assert [len(st["units"]) for st in s["stages"]] == [2, 1]
    assert s["student_block_params"] <= 0.25 * s["teacher_block_params"]


def test_a_schedule_trains_with_the_text_encoders_and_vae_parked(tiny_teacher, tmp_path, monkeypatch):
    from contextlib import contextmanager

    from slimdit.schedules import run as schedule_run

    seen, parked_now = [], []

    @contextmanager
    def recording(pipe, names, where="cpu"):
        parked_now.append(sorted(names))
        yield names
        parked_now.pop()

    real_train = schedule_run.train_protocol

    def training(*a, **k):
        seen.append(list(parked_now[-1]) if parked_now else None)
        return real_train(*a, **k)

    monkeypatch.setattr(schedule_run, "parked", recording)
    monkeypatch.setattr(schedule_run, "train_protocol", training)
    cfg = _cfg(tiny_teacher, tmp_path / "run", kind="one_shot", target=0.8, op="remove")
    cfg["eval"] = {"benchmark": None}
    schedule_run.run_schedule(cfg, progress=False)
    assert seen == [["text_encoder", "vae"]]  # the one stage trained while they waited off the device
