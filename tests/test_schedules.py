"""Linear progressive compression: eq. 4.15-4.21."""

from __future__ import annotations

import pytest

from slimdit.schedules.linear_progressive import cmmd_per_removed_parameter, feasible_range, linear_ratios


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
