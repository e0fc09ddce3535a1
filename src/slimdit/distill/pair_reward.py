"""Rejection sampling of the teacher's (noise, sample) pairs by a reward: the distillation's targets kept only where
the teacher's sample scores at least a threshold on its own caption (RAFT's filter, Dong et al. 2023, applied to a
sampler distillation's pairs instead of the model's own samples). A student regressed onto the teacher's pairs
(``method: direct``, ``reflow``, or DMD1's regression) learns the teacher's failures with its successes; with the
shapes world's detector verdict as the reward it learns only the samples that show what their caption asks.

The reward reads training captions only (the shapes world refuses an evaluation prompt), and each pair is scored
once: the scores are kept beside the pairs (``pairs/reward-<name>.json``, with the pairs' record), so a continued run
reads them back; scores of pairs made otherwise are made again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimdit.distill.reflow import PAIRS_RECORD
from slimdit.identity import without_revisions
from slimdit.io import read_json, write_json


def pair_scores(pipe, captions: list[str], x0: torch.Tensor, reward: str, folder: str | Path,
                batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """The reward of each pair's sample (``x0``, clean latents, row for row with ``captions``), decoded by
    ``pipe``'s VAE; computed once and kept in ``folder``."""
    from slimdit import registry
    from slimdit.data.cache import decode_latents

    if len(captions) != len(x0):
        raise ValueError(f"{len(captions)} captions for {len(x0)} pairs: the pairs must be the data's rows")
    f = Path(folder) / f"reward-{reward}.json"
    made = Path(folder) / PAIRS_RECORD  # the pairs' record (slimdit.distill.reflow): the scores are of these pairs
    pairs = read_json(made) if made.exists() else None
    if f.exists() and (saved := read_json(f)).get("pairs") == without_revisions(pairs) \
            and len(saved.get("scores", [])) == len(x0):
        return torch.tensor(saved["scores"])  # the file's name names the reward
    score = registry.REWARDS[reward]()
    out = []
    for a in tqdm(range(0, len(x0), batch_size), desc=f"pair rewards ({reward})", unit="batch",
                  disable=not progress):
        images = decode_latents(pipe, x0[a:a + batch_size], batch_size=batch_size)
        out += [float(v) for v in score(captions[a:a + batch_size], images)]
    write_json(f, {"reward": reward, "pairs": without_revisions(pairs), "scores": out})
    return torch.tensor(out)


class RowSubset:
    """Rows ``keep`` of a row-indexed tensor (or :class:`~slimdit.data.cache.Rows`), read on demand:
    ``view[idx]`` is ``rows[keep[idx]]``."""

    def __init__(self, rows, keep: torch.Tensor):
        self.rows, self.keep = rows, keep
        self.shape = torch.Size([len(keep), *rows.shape[1:]])

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx):
        return self.rows[self.keep[torch.as_tensor(idx)]]


def kept_pairs(noise: torch.Tensor, data, scores: torch.Tensor, minimum: float):
    """``(noise, data)`` of the pairs whose score is at least ``minimum`` (``data``: a
    :class:`~slimdit.distill.trainer.Conditioning` whose latents are the pairs' samples), and how many were kept."""
    from slimdit.distill.trainer import Conditioning

    keep = torch.nonzero(scores >= minimum).flatten()
    if not len(keep):
        raise ValueError(f"no pair's sample scores at least {minimum} (best {scores.max().item():.3f} of "
                         f"{len(scores)}): lower pair_reward_min or drop pair_reward")
    cond = {k: RowSubset(v, keep) for k, v in data.cond.items()}
    return noise[keep], Conditioning(data.latents[keep], cond, data.null), len(keep)
