"""How a sweep's results are grouped for its plot."""

from slimdit.experiments.sweep import series


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
