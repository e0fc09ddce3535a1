"""``shapes-oracle``: renders the ground truth of each prompt with fresh seeds. The ceiling of shapes-geneval
and the floor of FID and CMMD."""

from __future__ import annotations

import numpy as np

from slimdit.worlds.shapes.prompts import parse_prompt, render_prompt

ORACLE_SEED_SPACE = 7_919  # keeps oracle seeds apart from those of the reference renders


class OracleSampler:
    name = "shapes-oracle"

    def generate(self, prompts: list[str], seeds: list[int], progress: bool = True) -> np.ndarray:
        parsed = [parse_prompt(p) for p in prompts]  # fail on a bad prompt before any work
        return np.stack([render_prompt(p, np.random.default_rng((ORACLE_SEED_SPACE, int(s), hash_text(p.text))))
                         for p, s in zip(parsed, seeds)])


def hash_text(text: str) -> int:
    """A stable (process-independent) integer for a string."""
    import zlib

    return zlib.crc32(text.encode())
