"""Linear progressive compression (thesis section 4.6.3, eq. 4.15-4.21): per-unit ratios that fall linearly
from the least to the most important unit of a stage."""

from __future__ import annotations

from dataclasses import dataclass


def cmmd_per_removed_parameter(cmmd: dict[str, float], params: dict[str, int], c_fixed: float) -> dict[str, float]:
    """``s_i = CMMD_i / (P_i c_fixed)`` (eq. 4.15): degradation per removed parameter when every unit is
    compressed by the same fraction ``c_fixed``."""
    if not 0 < c_fixed < 1:
        raise ValueError(f"c_fixed must be in (0, 1), got {c_fixed}")
    return {u: cmmd[u] / (params[u] * c_fixed) for u in cmmd}


@dataclass(frozen=True)
class StageRatios:
    units: list[str]  # least important first
    ratios: list[float]  # c_i
    slope: float  # x
    removed: float  # sum P_i* c_i (= N)


def feasible_range(params: list[int], base: float) -> tuple[float, float]:
    """The N allowed by eq. 4.21 for sorted unit sizes ``params`` (least important first) and base ratio S."""
    k = len(params)
    total = base * sum(params)
    if k == 1:
        return total, total
    weighted = sum(p * i for i, p in enumerate(params))  # sum P_i* (i - 1)
    return total - base * weighted / (k - 1), total


def auto_units(scores: dict[str, float], params: dict[str, int], n_remove: float, base: float) -> int | None:
    """``units_per_stage: auto``: the k for which eq. 4.21 holds and ``n_remove`` lies nearest the middle of its
    feasible range, where the ratios fall linearly from S to about S/2 (None: no k is feasible). A fixed k suits
    units of one size; where sizes differ (a Flux's double and single blocks) a fixed k may be infeasible."""
    order = sorted(scores, key=scores.get)
    best, best_gap = None, None
    for k in range(1, len(order) + 1):
        lo, hi = feasible_range([params[u] for u in order[:k]], base)
        if not lo - 1e-9 * hi <= n_remove <= hi * (1 + 1e-12) or hi == lo:
            continue
        gap = abs((n_remove - lo) / (hi - lo) - 0.5)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best


def linear_ratios(scores: dict[str, float], params: dict[str, int], n_remove: float, k: int, base: float
                  ) -> StageRatios:
    """Compression ratios of one stage: the ``k`` lowest-score units, ``c_i = S - (i-1) x`` (eq. 4.16) with
    ``x`` from eq. 4.19; fail with the feasible range of N when eq. 4.21 does not hold."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be between 1 and {len(scores)} units, got {k}")
    if not 0 < base < 1:
        raise ValueError(f"base ratio S must be in (0, 1), got {base}")
    units = sorted(scores, key=scores.get)[:k]
    p = [params[u] for u in units]
    lo, hi = feasible_range(p, base)
    if not lo - 1e-9 * hi <= n_remove <= hi * (1 + 1e-12):
        raise ValueError(f"removing N = {n_remove:,.0f} parameters from k = {k} units with S = {base} is infeasible "
                         f"(eq. 4.21): N must lie in [{lo:,.0f}, {hi:,.0f}]; change N, k or S")
    weighted = sum(pi * i for i, pi in enumerate(p))
    x = 0.0 if k == 1 else (base * sum(p) - n_remove) / weighted
    ratios = [base - i * x for i in range(k)]
    return StageRatios(units, ratios, x, sum(pi * c for pi, c in zip(p, ratios)))
