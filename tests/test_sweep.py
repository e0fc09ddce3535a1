"""Sweep points and how their results are grouped for the plot."""

from pathlib import Path

import pytest
import yaml

from slimdit.config import RunConfig, load_config
from slimdit.experiments.sweep import SweepConfig, grid_values, load_sweep, points, series


def _schedule_row(kind, target, ratio, overall):
    return {"point": f"{kind}__{target}", "grid": {"schedule.kind": kind, "schedule.target": target},
            "stages": [{"block_param_ratio": 0.9, "overall": 0.9}, {"block_param_ratio": ratio, "overall": overall}]}


def test_series_follow_the_size_key_and_the_ratio_reached():
    rows = [_schedule_row("one_shot", 0.8, 0.79, 0.6), _schedule_row("one_shot", 0.6, 0.58, 0.4),
            _schedule_row("progressive", 0.6, 0.61, 0.5), _schedule_row("progressive", 0.8, 0.81, 0.7)]
    s = series(rows, ["schedule.kind", "schedule.target"])
    # one line per schedule kind; x is the ratio the last stage reached, sorted; y its overall
    assert s == {"one_shot": [(0.58, 0.4), (0.79, 0.6)], "progressive": [(0.61, 0.5), (0.81, 0.7)]}


def test_series_without_a_size_key_name_the_points():
    rows = [{"point": p, "grid": {"train.kd": p}, "block_params": {"ratio": 0.67},
             "student_metrics": {"overall": y}, "untrained_metrics": {"overall": 0.5}}
            for p, y in (("output", 0.3), ("normalized", 0.4))]
    assert series(rows, ["train.kd"]) == {"all": [("output", 0.3), ("normalized", 0.4)]}
    assert series(rows, ["train.kd"], "untrained.overall") == {"all": [("output", 0.5), ("normalized", 0.5)]}


def test_a_named_group_of_overrides_varies_together():
    cfg = SweepConfig(out="o", base={}, set={"eval.limit": 6}, grid={
        "schedule": [{"name": "one_shot", "schedule.kind": "one_shot", "train.steps": 400},
                     {"name": "progressive", "schedule.kind": "progressive", "train.steps": 200}],
        "schedule.target": [0.8, 0.6]})
    got = dict(points(cfg))
    assert list(got) == ["one_shot__0.8", "one_shot__0.6", "progressive__0.8", "progressive__0.6"]
    assert got["progressive__0.6"] == {"eval.limit": 6, "schedule.kind": "progressive", "train.steps": 200,
                                       "schedule.target": 0.6}
    assert grid_values(cfg, "one_shot__0.6") == {"schedule": "one_shot", "schedule.target": 0.6}
    cfg.grid["schedule"].append({"schedule.kind": "linear_progressive"})
    with pytest.raises(ValueError, match="needs a name"):
        points(cfg)


def test_one_points_overrides_do_not_leak_into_the_next(tmp_path):
    base = {"teacher": "shapes-pixart", "out": "x", "schedule": {"kind": "one_shot", "stages": 3}}
    sweep = {"kind": "run", "out": str(tmp_path / "o"), "base": base,
             "grid": {"schedule": [{"name": "p", "schedule.kind": "progressive", "schedule.stages": 2},
                                   {"name": "o", "schedule.kind": "one_shot"}]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    _, configs = load_sweep(tmp_path / "sweep.yaml")
    assert [c.schedule.stages for _, c in configs] == [2, 3]  # the second point keeps the base's 3
    load_config(base, RunConfig, {"schedule.stages": 5})
    assert base["schedule"]["stages"] == 3  # the caller's dict is not written into


def test_a_finished_point_made_from_another_config_is_refused_and_two_points_cannot_share_a_name(tmp_path):
    """Rerunning a sweep whose base changed must not keep the old points' results beside the new ones."""
    from slimdit.experiments.sweep import run_sweep
    from slimdit.identity import check_run_dir, input_fingerprints

    base = {"teacher": "shapes-pixart", "out": "x", "schedule": {"kind": "one_shot", "stages": 1}}
    sweep = {"kind": "run", "out": str(tmp_path / "o"), "base": base, "set": {"eval.limit": 6},
             "grid": {"schedule.target": [0.8]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    _, [(name, cfg)] = load_sweep(tmp_path / "sweep.yaml")
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))  # the point as a finished run of this config left it
    (Path(cfg.out) / "summary.json").write_text("{}")
    sweep["set"] = {"eval.limit": 7}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ValueError, match="config eval.limit: 6 -> 7"):
        run_sweep(tmp_path / "sweep.yaml", progress=False)  # refused before any point runs
    assert sorted(p.name for p in (tmp_path / "o" / name).iterdir()) == ["config.yaml", "inputs.json", "summary.json"]
    two = SweepConfig(out="o", base={}, grid={"plan": ["plans/a/x.yaml", "plans/b/x.yaml"]})
    with pytest.raises(ValueError, match="both named 'x'"):
        points(two)


def test_a_finished_point_scored_by_another_scorer_runs_again_and_one_scored_as_now_does_not(tmp_path, monkeypatch):
    """Results of two scorers (an older detector's beside today's) never sit in one sweep table."""
    import json

    import slimdit.schedules.run
    from slimdit.experiments.sweep import run_sweep
    from slimdit.identity import check_run_dir, input_fingerprints
    from slimdit.worlds.shapes.benchmark import scorer_digest

    ran = []
    monkeypatch.setattr(slimdit.schedules.run, "run_schedule", lambda cfg, progress=True: ran.append(cfg.out))
    base = {"teacher": "shapes-pixart", "out": "x", "schedule": {"kind": "one_shot", "stages": 1}}
    sweep = {"kind": "run", "out": str(tmp_path / "o"), "base": base, "set": {"eval.limit": 6},
             "grid": {"schedule.target": [0.8]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    _, [(_, cfg)] = load_sweep(tmp_path / "sweep.yaml")
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    (Path(cfg.out) / "summary.json").write_text(json.dumps({"stages": [{"block_param_ratio": 0.8, "overall": 0.5}]}))
    stage = Path(cfg.out) / "stages" / "00"
    stage.mkdir(parents=True)
    for scored_by, runs in ((scorer_digest(), 0), ("an older detector", 1)):
        (stage / "eval.json").write_text(json.dumps({"overall": 0.5, "scored_by": scored_by}))
        ran.clear()
        run_sweep(tmp_path / "sweep.yaml", progress=False)
        assert len(ran) == runs
