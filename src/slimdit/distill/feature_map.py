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
    idx = [pos[u] for u in kept_units]
    if idx != sorted(idx):
        raise ValueError("kept units must be in teacher order")
    group = lambda u: u.partition(".")[0]  # noqa: E731  (Flux: double and single units are separate lists)
    pairs = []
    for j, (u, i) in enumerate(zip(kept_units, idx)):
        nxt = idx[j + 1] if j + 1 < len(idx) and group(kept_units[j + 1]) == group(u) else None
        if nxt is None:  # last kept unit of its group: the gap runs to the group's end
            same = [k for k, t in enumerate(teacher_units) if group(t) == group(u)]
            end = same[-1]
        else:
            end = nxt - 1
        pairs.append((f"{group(u)}.{j - _group_start(kept_units, j)}", teacher_units[end]))
    return pairs


def _group_start(kept: list[str], j: int) -> int:
    g = kept[j].partition(".")[0]
    return next(k for k, u in enumerate(kept) if u.partition(".")[0] == g)
