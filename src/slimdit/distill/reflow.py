"""Rectified-flow reflow (Liu et al. 2023, "Flow Straight and Fast"; InstaFlow's text-conditioned form): the
teacher's ODE couples each noise ``z`` with the clean sample ``x0`` it flows to; training the student's velocity on
the straight line between them, ``x_t = (1 - t) x0 + t z`` with target ``z - x0``, straightens its paths, so Euler
steps lose less when there are few of them.

Pairs are made once per run by the teacher's deterministic Euler sampling (its own flow grid, ``pair_steps`` steps,
guided: a CFG teacher at ``w`` with the empty caption, a guidance-embedded one with ``w`` as its input) and kept on
disk in safetensors shards (a resumed run reuses the finished ones), beside ``pairs.json``, the record of what made
them; shards a record does not match, or that have none, are refused by name, never reused. Reflow is for flow
teachers; the pairs are any teacher's (DDIM steps for a diffusion one), and :mod:`slimdit.distill.direct` regresses
a diffusion student on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimdit.distill.losses import Batch, per_sample_mse
from slimdit.distill.steps import deterministic_sample
from slimdit.io import load_tensors, read_json, save_tensors, write_json

SHARD = 1024
PAIRS_RECORD = "pairs.json"


@torch.no_grad()
def ode_sample(adapter, model, noise: torch.Tensor, cond: dict, null: dict | None, guidance: float,
               t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Deterministic sampling from ``noise`` along the grid ``(t, s)`` (its last ``s`` is the clean end)."""
    return deterministic_sample(adapter, model, noise, cond, null, guidance, t, s).to(noise.dtype)


def teacher_pairs(adapter, teacher, data, out: str | Path, t: torch.Tensor, s: torch.Tensor, guidance: float,
                  seed: int, batch_size: int = 64, progress: bool = True,
                  part: tuple[int, int] | None = None, made_by: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(noise, x0)`` for every row of ``data`` (a :class:`~slimdit.distill.trainer.Conditioning`): row i's noise
    is drawn from ``(seed, i)``, so a shard made again is the same. Shards on disk are reused when ``out``'s record
    (:func:`check_pairs_record`) says they were made the same way; ``made_by`` names what else made them (the
    teacher's and the data's identity). With ``part = (k, n)`` only shards ``k, k + n, ...`` are made and nothing is
    returned (process k of n makes its share).

    The pairs are returned in host memory (two latents per row)."""
    out = Path(out)
    check_pairs_record(out, pairs_record(teacher, data, t, s, guidance, seed, made_by))
    dev = next(teacher.parameters()).device
    dtype = data.latents[:1].dtype  # (the cache's rows are read lazily)
    guided_input = adapter.takes_guidance(teacher)
    noises, x0s = [], []
    starts = range(0, len(data), SHARD)
    mine = [a for a in starts if part is None or (a // SHARD) % part[1] == part[0]]
    for a in tqdm(mine, desc="teacher pairs", unit="shard", disable=not progress or len(mine) <= 1):
        f = out / f"pairs_{a // SHARD:05d}.safetensors"
        if not f.exists():
            rows = range(a, min(a + SHARD, len(data)))
            z = torch.stack([torch.randn(tuple(data.latents.shape[1:]), generator=torch.Generator().manual_seed(
                hash((seed, i)) & (2**62 - 1))) for i in rows]).to(dtype)
            x0 = []
            for b in range(0, len(rows), batch_size):
                idx = torch.tensor(list(rows[b:b + batch_size]))
                cond = {k: v.to(dev) for k, v in data.take(idx).items()}
                null = None
                if guided_input:
                    cond["guidance"] = torch.full((len(idx),), guidance, device=dev)
                elif guidance != 1:
                    null = {k: v.to(dev).expand(len(idx), *v.shape[1:]) for k, v in data.null.items()}
                x0.append(ode_sample(adapter, teacher, z[b:b + batch_size].to(dev), cond, null, guidance, t, s).cpu())
            save_tensors(f, {"noise": z, "x0": torch.cat(x0)})
        if part is not None:
            continue
        pair = load_tensors(f)
        noises.append(pair["noise"])
        x0s.append(pair["x0"])
    return None if part is not None else (torch.cat(noises), torch.cat(x0s))


def pairs_record(teacher, data, t: torch.Tensor, s: torch.Tensor, guidance: float, seed: int,
                 made_by: dict | None) -> dict:
    """What makes a set of pairs, as ``pairs.json`` keeps it: the teacher and data (``made_by``), the guidance, the
    grid, the seed, the rows, the latent and text shapes and the teacher's precision."""
    return {"made_by": made_by, "guidance": float(guidance), "t": t.tolist(), "s": s.tolist(), "seed": seed,
            "rows": len(data), "latent": list(data.latents.shape[1:]),
            "text": {k: list(v.shape[1:]) for k, v in data.cond.items()},
            "teacher_dtype": str(next(teacher.parameters()).dtype)}


def reuse_pairs(out: Path, record: dict, sources: list[Path]) -> Path | None:
    """Link into ``out`` (hard links where the file system allows, else copies) the shards of the first of
    ``sources`` whose ``pairs.json`` matches ``record`` field for field, when ``out`` holds no shard yet; return
    that source (None: nothing reused, ``out`` untouched)."""
    import os
    import shutil

    from slimdit.identity import changed_fields

    out = Path(out)
    if list(out.glob("pairs_*.safetensors")):
        return None
    record = json.loads(json.dumps(record))  # as it reads back
    for src in sources:
        shards = sorted(Path(src).glob("pairs_*.safetensors"))
        if not shards or not (Path(src) / PAIRS_RECORD).exists():
            continue
        if changed_fields(read_json(Path(src) / PAIRS_RECORD), record):
            continue
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PAIRS_RECORD, record)
        for f in shards:
            try:
                os.link(f, out / f.name)
            except OSError:  # another file system: a copy, under its name only once whole
                tmp = out / f".{f.name}.part"
                shutil.copy2(f, tmp)
                os.replace(tmp, out / f.name)
        return Path(src)
    return None


def check_pairs_record(out: Path, record: dict) -> None:
    """Write ``record`` (what makes the pairs) as ``out/pairs.json`` before the first shard, or check it against
    the one there: pairs made by another teacher, guidance, grid, seed, data, text length or teacher precision
    (copied in from another run, or left by a run that failed before its first checkpoint and was then changed)
    are refused with what differs, and shards with no record are refused too, before any training."""
    from slimdit.identity import changed_fields

    record = json.loads(json.dumps(record))  # as it reads back
    f = out / PAIRS_RECORD
    shards = sorted(out.glob("pairs_*.safetensors"))  # each process writes the record before its first shard
    if not shards:  # no pairs yet (a record alone is a run's that stopped in its first shard): today's config's
        write_json(f, record)
        return
    if not f.exists():
        raise ValueError(f"{out} holds {len(shards)} teacher pair shards but no {PAIRS_RECORD} saying what made them "
                         f"(copied in without it, or written before slimdit kept one): delete them to make them again")
    saved = read_json(f)
    if diff := changed_fields(saved, record):
        raise ValueError(f"the teacher pairs in {out} were made otherwise ({'; '.join(diff)}): delete {out} to make "
                         "them again, or run with the settings that made them")
    if saved != record:  # matched by a legacy rule (a hub id now named with its revision): the record gains it
        write_json(f, record)


@dataclass
class ReflowLoss:
    """``|| v(x_t, t) - (z - x0) ||^2`` on the teacher's pairs, at the objective's timesteps; the trainer's data
    rows hold the pairs' ``x0`` as latents, ``noise`` their ``z``. A guidance-embedded student gets the pairs'
    guidance as its input."""

    adapter: object
    noise: torch.Tensor  # (N, ...) the pairs' noise, row for row with the data's latents (the pairs' x0)
    guidance: float | None = None  # the guidance input the pairs were made at (guidance-embedded models)

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.index is None:
            raise ValueError("ReflowLoss needs the batch's data rows (batch.index) to find their noise")
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        inner = getattr(student, "module", student)
        z = self.noise[batch.index].to(x0.device, x0.dtype)
        t = obj.sample_t(x0.shape[0], g, a.image_tokens(inner, x0)).to(x0.device)
        xt, target = obj.noise(x0, z, t)
        cond = batch.cond
        if self.guidance is not None and a.takes_guidance(inner):
            cond = {**cond, "guidance": torch.full((x0.shape[0],), self.guidance, device=x0.device)}
        with batch.autocast():
            pred = a.prediction(inner, a.predict(student, xt, t, cond))
        loss = per_sample_mse(pred, target).mean()
        return {"total": loss, "reflow": loss.detach()}
