"""Learnable masks (TinyFusion, Fang et al. 2025; thesis section 4.2.2, eq. 4.5): which N of every M
consecutive units to keep, learned so that the pruned model's *recoverability* is optimised.

Each group has a categorical distribution over its C(M, N) keep patterns. Every step samples a pattern per
group with straight-through Gumbel-softmax (temperature annealed from ``tau_start`` to ``tau_end``), runs the
model with the dropped units bypassed (``x + m (B(x) - x)`` with the sampled gate m), and trains the pattern
logits jointly with LoRA weight updates (peft) on the distillation loss against the teacher. The most likely
pattern of each group gives the plan.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimdit.compress.plan import Plan, UnitOp
from slimdit.distill.losses import Batch, KDLoss
from slimdit.distill.trainer import Conditioning
from slimdit.models.base import Adapter


@dataclass
class MaskConfig:
    group_size: int = 2  # M
    keep: int = 1  # N
    steps: int = 200
    batch_size: int = 8
    lr_logits: float = 5e-2
    lr_lora: float = 1e-4
    lora_rank: int = 4
    tau_start: float = 4.0
    tau_end: float = 0.1
    kd: str = "hybrid"
    seed: int = 0


def _patterns(m: int, n: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(m), n))


def learn_masks(adapter: Adapter, teacher: torch.nn.Module, data: Conditioning, cfg: MaskConfig
                ) -> tuple[Plan, dict]:
    """Learn N:M keep patterns over the units of ``teacher`` (left untouched); return the removal plan."""
    from peft import LoraConfig, inject_adapter_in_model

    if not 1 <= cfg.keep < cfg.group_size:
        raise ValueError(f"keep N must be in [1, group_size M), got N={cfg.keep}, M={cfg.group_size}")
    units = adapter.units(teacher)
    groups = [units[i:i + cfg.group_size] for i in range(0, len(units) - cfg.group_size + 1, cfg.group_size)]
    pats = _patterns(cfg.group_size, cfg.keep)
    member = torch.tensor([[1.0 if j in p else 0.0 for j in range(cfg.group_size)] for p in pats])  # (P, M)

    student = copy.deepcopy(teacher).train()
    student.requires_grad_(False)
    names = {id(mod): name for name, mod in student.named_modules()}
    targets = [names[id(layer)] for u in units for part in adapter.parts(student, u)
               for layer in adapter.layers(student, u, part).values()]  # full paths of every part's layers
    student = inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                                 target_modules=targets), student)
    lora = [p for n, p in student.named_parameters() if "lora_" in n]
    dev = next(teacher.parameters()).device
    logits = torch.nn.Parameter(torch.zeros(len(groups), len(pats), device=dev))
    opt = torch.optim.Adam([{"params": [logits], "lr": cfg.lr_logits}, {"params": lora, "lr": cfg.lr_lora}])
    member = member.to(dev)
    gates = torch.ones(len(groups), cfg.group_size, device=dev)
    where = {u: (g, j) for g, group in enumerate(groups) for j, u in enumerate(group)}

    def gate(unit, inputs, outputs):  # x + m (B(x) - x) on every stream the unit writes
        m = gates[where[unit]]
        return {s: inputs[s] + m * (outputs[s] - inputs[s]) for s in outputs}

    kd = KDLoss(adapter, cfg.kd)  # output KD on the masked student, the same loss the trainer runs
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    with adapter.hooked(student, list(where), gate):
        for step in tqdm(range(cfg.steps), desc="masks", unit="step", dynamic_ncols=True, leave=False):
            tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
            u = torch.rand(logits.shape, generator=gen).clamp(1e-9, 1 - 1e-9).to(dev)
            w = F.softmax((logits - torch.log(-torch.log(u))) / tau, -1)  # Gumbel-softmax (G, P)
            hard = F.one_hot(w.argmax(-1), len(pats)).float()
            w = hard + w - w.detach()  # straight through: a real N:M network forward, gradients to the logits
            gates = w @ member  # (G, M)
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
            batch = Batch(data.latents[idx].to(dev), {k: v.to(dev) for k, v in data.take(idx).items()}, gen)
            loss = kd(student, teacher, batch)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                history.append({"step": step, "tau": tau, "loss": float(loss.detach()),
                                "probs": F.softmax(logits.detach(), -1).tolist()})
    logits = logits.detach()
    choice = logits.argmax(-1)
    removed = [u for g, group in enumerate(groups) for j, u in enumerate(group) if j not in pats[choice[g]]]
    info = {"groups": groups, "patterns": [list(p) for p in pats], "chosen": [list(pats[c]) for c in choice],
            "entropy": float(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()),
            "max_entropy": math.log(len(pats)), "history": history}
    return Plan([UnitOp(u, "remove") for u in removed]), info
