"""Report pieces drawn from run-directory files alone."""

import json

from slimdit.reports.training import plot_training, training_curves


def _phase(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_training_curves_follow_the_stages_and_phases_in_order(tmp_path):
    _phase(tmp_path / "stages" / "01" / "phases" / "00_global", [{"step": 10, "total": 1.0}])
    _phase(tmp_path / "stages" / "00" / "phases" / "01_refine", [{"step": 5, "total": 2.0}])
    _phase(tmp_path / "stages" / "00" / "phases" / "00_global",
           [{"step": 10, "total": 3.0}, {"step": 10, "val_traj_mse": 0.01}])
    curves = training_curves(tmp_path)
    assert [n for n, _ in curves] == ["stage 00 00_global", "stage 00 01_refine", "stage 01 00_global"]
    assert curves[0][1][1] == {"step": 10, "val_traj_mse": 0.01}
    assert plot_training(tmp_path, tmp_path / "t.png").stat().st_size > 0
    assert plot_training(tmp_path / "empty", tmp_path / "e.png") is None and not (tmp_path / "e.png").exists()


def test_a_distill_runs_phases_are_its_own(tmp_path):
    _phase(tmp_path / "phases" / "00_local", [{"step": 3, "total": 1.0}])
    _phase(tmp_path / "phases" / "01_global", [{"step": 3, "total": 0.5}])
    assert [n for n, _ in training_curves(tmp_path)] == ["00_local", "01_global"]


def test_unit_tick_labels_keep_the_group_only_when_units_span_groups():
    from slimdit.reports.plots import tick_labels

    assert tick_labels(["block.0", "block.11"]) == ["0", "11"]
    assert tick_labels(["double.0", "double.3", "single.0", "single.7"]) == ["d0", "d3", "s0", "s7"]


def test_the_report_warns_when_its_evaluations_were_scored_by_different_scorers(tmp_path):
    import json

    from slimdit.reports.html import build_report

    (tmp_path / "metrics").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"description": "a run"}))
    for student_scorer, warned in (("today's detector", False), ("an older detector", True)):
        for name, overall, scorer in (("teacher", 0.8, "today's detector"), ("student", 0.6, student_scorer)):
            (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps({"overall": overall, "scored_by": scorer}))
        assert ("scored by different scorers" in build_report(tmp_path).read_text()) is warned
