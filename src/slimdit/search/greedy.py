"""Greedy selection (thesis section 4.2.2): score every unmodified unit on the already-modified model, take
the best, repeat."""

from __future__ import annotations

from collections.abc import Callable


def greedy(score: Callable[[list[str]], float], units: list[str], k: int) -> tuple[list[str], list[dict]]:
    """Choose ``k`` units one at a time; ``score(chosen)`` is the cost of modifying exactly ``chosen`` (lower
    is better, e.g. CMMD). Returns the choice and, per round, every candidate's score."""
    if not 1 <= k <= len(units):
        raise ValueError(f"k must be between 1 and {len(units)}, got {k}")
    chosen: list[str] = []
    history = []
    for _ in range(k):
        scores = {u: score([*chosen, u]) for u in units if u not in chosen}
        best = min(scores, key=scores.get)
        chosen.append(best)
        history.append({"chosen": best, "scores": scores})
    return chosen, history
