"""Finetuning protocols (thesis section 5.1.5): phases, each with trainable units, a dataset and a length.

Phase lengths are fractions of the run's step budget, in the thesis' proportions (38k / 38k / 12.5k steps).
"""

from __future__ import annotations

from dataclasses import dataclass

SELECTORS = ("preceding", "modified", "all")


@dataclass(frozen=True)
class Phase:
    name: str
    trainable: tuple[str, ...]  # of SELECTORS
    dataset: str  # real | synth
    fraction: float


PROTOCOLS: dict[str, list[Phase]] = {
    "three_stage": [Phase("local", ("preceding", "modified"), "real", 38 / 88.5),
                    Phase("global", ("all",), "real", 38 / 88.5),
                    Phase("refine", ("all",), "synth", 12.5 / 88.5)],
    "two_stage": [Phase("global", ("all",), "real", 76 / 88.5),
                  Phase("refine", ("all",), "synth", 12.5 / 88.5)],
    "real_only": [Phase("local", ("preceding", "modified"), "real", 38 / 88.5),
                  Phase("global", ("all",), "real", 50.5 / 88.5)],
}


def phase_steps(phases: list[Phase], total: int) -> list[int]:
    """Split ``total`` steps over phases by their fractions (at least one step each)."""
    s = sum(p.fraction for p in phases)
    steps = [max(1, round(total * p.fraction / s)) for p in phases]
    steps[-1] = max(1, total - sum(steps[:-1]))
    return steps


def trainable_units(selectors: tuple[str, ...], teacher_units: list[str], kept_units: list[str],
                    modified: list[str]) -> list[str] | None:
    """Student unit names a phase trains (``None`` = the whole model).

    ``preceding``: for every removed or compressed unit, the last kept unit before it; ``modified``: the kept
    units that were compressed.
    """
    bad = [s for s in selectors if s not in SELECTORS]
    if bad:
        raise ValueError(f"trainable selector(s) {bad}; allowed: {', '.join(SELECTORS)}")
    if "all" in selectors:
        return None
    student_name: dict[str, str] = {}  # teacher name -> student name (index within its group)
    for g in dict.fromkeys(u.partition(".")[0] for u in kept_units):
        members = [u for u in kept_units if u.partition(".")[0] == g]
        student_name.update({u: f"{g}.{j}" for j, u in enumerate(members)})
    chosen: set[str] = set()
    kept = set(kept_units)
    if "modified" in selectors:
        chosen |= {u for u in modified if u in kept}
    if "preceding" in selectors:
        for u in modified:
            i = teacher_units.index(u)
            before = [t for t in teacher_units[:i] if t in kept and t.partition(".")[0] == u.partition(".")[0]]
            if before:
                chosen.add(before[-1])
    return [student_name[u] for u in kept_units if u in chosen]


def resolve_protocol(protocol) -> list[Phase]:
    """A built-in protocol's name, or a config list of phases (objects with name/trainable/dataset/fraction)."""
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        return PROTOCOLS[protocol]
    return [Phase(p.name, tuple(p.trainable), p.dataset, p.fraction) for p in protocol]
