"""Which student unit is matched to which teacher unit in feature KD (thesis section 4.5.2)."""

from __future__ import annotations


def feature_map(teacher_units: list[str], kept_units: list[str]) -> list[tuple[str, str]]:
    """Return (student unit, teacher unit) pairs.

    ``kept_units`` are the teacher names of the student's units, in order. A unit followed by no gap is
    matched to itself (the SVD case, l <-> l). When teacher units l-i..l were removed, the last kept unit
    before the gap, l-(i+1), is matched to teacher unit l, the end of the gap. A gap at the very start has no
    kept unit before it and so no pair.
    """
    pos = {u: i for i, u in enumerate(teacher_units)}
    missing = [u for u in kept_units if u not in pos]
    if missing:
        raise ValueError(f"kept units {missing} are not teacher units")
    if [pos[u] for u in kept_units] != sorted(pos[u] for u in kept_units):
        raise ValueError("kept units must be in teacher order")
    pairs = []
    # Flux keeps double and single units in separate lists: gaps never run from one group into the other
    for group in dict.fromkeys(_group(u) for u in teacher_units):
        teacher = [u for u in teacher_units if _group(u) == group]
        kept = [u for u in kept_units if _group(u) == group]
        for j in range(len(kept)):
            end = teacher.index(kept[j + 1]) - 1 if j + 1 < len(kept) else len(teacher) - 1
            pairs.append((f"{group}.{j}", teacher[end]))
    return pairs


def _group(unit: str) -> str:
    return unit.partition(".")[0]
