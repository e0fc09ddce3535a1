"""Few-step sampling grids: the steps a few-step student takes, exactly as the diffusers scheduler it is saved with
takes them, so training and sampling visit the same timesteps.

A diffusion (DDPM-family) student samples with ``DDIMScheduler`` (``trailing`` spacing, so the first step starts
at pure noise; no clipping; the last step lands on the clean image). A flow student keeps its flow-matching Euler
scheduler, whose steps are deterministic already, with the sigmas its pipeline sets (Flux: ``linspace(1, 1/N, N)``,
shifted by the image's token count).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from slimdit.distill.objectives import DDPM, RectifiedFlow, _calculate_shift, objective_for


def student_scheduler(scheduler_config: dict):
    """The diffusers scheduler a few-step student of a teacher with ``scheduler_config`` samples with."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(objective_for(scheduler_config), RectifiedFlow):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", clip_sample=False,
                                     thresholding=False, set_alpha_to_one=True, steps_offset=0)


def transitions(scheduler_config: dict, steps: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)``: where each of the ``steps`` sampling steps starts and lands, as the student's scheduler steps
    (the clean end is ``-1`` for DDIM, ``0`` for flow). ``tokens``: the image token count (dynamic flow shift)."""
    sched = student_scheduler(scheduler_config)
    if isinstance(objective_for(scheduler_config), RectifiedFlow):
        cfg = sched.config
        kwargs = {}
        if cfg.get("use_dynamic_shifting"):
            if tokens is None:
                raise ValueError("a dynamically shifted flow schedule needs the image token count")
            kwargs["mu"] = _calculate_shift(tokens, cfg.get("base_image_seq_len") or 256,
                                            cfg.get("max_image_seq_len") or 4096, cfg.get("base_shift") or 0.5,
                                            cfg.get("max_shift") or 1.15)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)  # as FluxPipeline sets them
        sig = sched.sigmas.float()
        n = sched.config.num_train_timesteps
        return sig[:-1] * n, sig[1:] * n
    sched.set_timesteps(steps)
    t = sched.timesteps.long()
    return t, t - sched.config.num_train_timesteps // steps  # DDIM's own prev_timestep; < 0 is the clean end


def midpoints(scheduler_config: dict, steps: int, tokens: int | None = None) -> torch.Tensor:
    """Where a teacher sampling at ``2 steps`` lands between two of the ``steps``-step grid's points: the odd
    points of its own grid (for a shifted flow schedule these are not the halfway points)."""
    t2, _ = transitions(scheduler_config, 2 * steps, tokens)
    return t2[1::2]


def deterministic_step(objective: DDPM | RectifiedFlow, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
    """One DDIM (eta 0) / flow Euler step from ``t`` to ``s``: ``x_s = alpha_s x0_hat + sigma_s eps_hat``."""
    x0 = objective.x0(x, pred, t)
    a_t, s_t = objective.coefficients(t, x)
    a_s, s_s = objective.coefficients(s, x)
    return a_s * x0 + s_s * (x - a_t * x0) / s_t


def stochastic_step(objective: DDPM | RectifiedFlow, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                    s: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of one DDIM step with ``eta`` from ``t`` to ``s``, for any interpolation
    ``x_t = alpha_t x0 + sigma_t eps`` (diffusion and flow alike): the posterior ``q(x_s | x_t, x0_hat)`` scaled by
    ``eta``, ``std^2 = eta^2 sigma_s^2 (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)``, and
    ``mean = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat``. For DDPM it is ``DDIMScheduler.step(eta=eta)``;
    ``eta = 0`` is :func:`deterministic_step`; the last step (``sigma_s = 0``) is deterministic."""
    x0 = objective.x0(x, pred, t)
    a_t, s_t = objective.coefficients(t, x)
    a_s, s_s = objective.coefficients(s, x)
    eps = (x - a_t * x0) / s_t
    ratio = (a_t * s_s / (a_s * s_t)).clamp(max=1.0)
    std = eta * s_s * (1 - ratio ** 2).clamp_min(0).sqrt()
    return a_s * x0 + (s_s ** 2 - std ** 2).clamp_min(0).sqrt() * eps, std


def check_cfg_scale(adapter, model, guidance: float, name: str) -> None:
    """Refuse a CFG scale below 1 for ``model`` (named ``name``) when it guides by classifier-free guidance: its
    pipeline runs CFG only above 1, so training on such a scale would distil guidance it never samples with. A
    guidance-distilled model takes any scale as its input."""
    if not adapter.takes_guidance(model) and guidance < 1:
        raise ValueError(f"guidance {guidance}: {name} guides by classifier-free guidance, which its pipeline runs "
                         "only at a scale above 1 (1 turns it off); use 1 (no guidance) or more")


def guided_prediction(adapter, model, x, t, cond, null, guidance) -> torch.Tensor:
    """The model's prediction at ``x``, with CFG at ``guidance`` when ``null`` (the empty caption's) is given;
    ``model`` may be wrapped (DDP)."""
    inner = getattr(model, "module", model)
    c = adapter.prediction(inner, adapter.predict(model, x, t, cond))
    if null is None:
        return c
    u = adapter.prediction(inner, adapter.predict(model, x, t, null))
    return u + guidance * (c - u)


def deterministic_sample(adapter, model, noise: torch.Tensor, cond: dict, null: dict | None, guidance: float,
                         t: torch.Tensor, s: torch.Tensor, autocast=nullcontext, predict=guided_prediction
                         ) -> torch.Tensor:
    """The clean sample (in float) of deterministic sampling from ``noise`` along the grid ``(t, s)``, whose last
    ``s`` is the clean end; guided as ``predict`` does (:func:`guided_prediction`, or
    :func:`batched_guided_prediction` for a ``null`` expanded to the batch). Steps are taken in float, and the
    latents between them kept in ``noise``'s dtype. Gradients flow through every step while they are on."""
    x, n = noise, noise.shape[0]
    for j, (ti, si) in enumerate(zip(t, s)):
        tt, ss = ti.expand(n).to(x.device), si.expand(n).to(x.device)
        with autocast():
            pred = predict(adapter, model, x, tt, cond, null, guidance).float()
        x = deterministic_step(adapter.objective, x.float(), pred, tt, ss)
        if j < len(t) - 1:
            x = x.to(noise.dtype)
    return x


def group_conditions(adapter, model, cond: dict, null: dict | None, guidance: float, group: int,
                     device) -> tuple[dict, dict | None]:
    """Each prompt's conditioning repeated for its ``group`` images, and how they are guided: a guidance input for
    a guidance-distilled ``model``, else the empty caption's conditioning ``null`` (CFG) when ``guidance != 1``."""
    cond = {k: v.repeat_interleave(group, 0) for k, v in cond.items()}
    b = next(iter(cond.values())).shape[0]
    if adapter.takes_guidance(model):
        return {**cond, "guidance": torch.full((b,), guidance, device=device)}, None
    if null is None or guidance == 1:
        return cond, None
    return cond, {k: v.to(device).expand(b, *v.shape[1:]) for k, v in null.items()}


def batched_guided_prediction(adapter, model, x, t, cond, null, guidance) -> torch.Tensor:
    """:func:`guided_prediction` with the conditional and the empty caption in one batch (``null`` expanded to
    ``x``'s batch, as :func:`group_conditions` gives it); ``model`` may be wrapped (DDP, FSDP)."""
    inner = getattr(model, "module", model)
    if null is None:
        return adapter.prediction(inner, adapter.predict(model, x, t, cond))
    both = {k: torch.cat([cond[k], null[k]]) for k in cond}
    c, u = adapter.prediction(inner, adapter.predict(model, torch.cat([x, x]), torch.cat([t, t]), both)).chunk(2)
    return u + guidance * (c - u)


def simulate(adapter, student, batch, t: torch.Tensor, s: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    """A few-step student's clean sample at a drawn step of its grid ``(t, s)``: *backward simulation* runs the
    student from noise through the steps before it (no graph), so it trains on the inputs it meets when sampling;
    only the drawn step's prediction keeps its graph. The student samples without CFG (a guidance-distilled one
    takes ``guidance`` as its input). The step, then the noise, are drawn from ``batch.generator``."""
    obj, g = adapter.objective, batch.generator
    cond, _ = group_conditions(adapter, getattr(student, "module", student), batch.cond, None, guidance, 1,
                               batch.x0.device)
    n, dev = batch.x0.shape[0], batch.x0.device
    k = int(torch.randint(len(t), (1,), generator=g))
    x = torch.randn(batch.x0.shape, generator=g).to(dev, batch.x0.dtype)
    for j in range(k + 1):
        tt = t[j].expand(n).to(dev)
        with torch.set_grad_enabled(j == k and torch.is_grad_enabled()), batch.autocast():
            pred = batched_guided_prediction(adapter, student, x, tt, cond, None, guidance).float()
        if j == k:
            return obj.x0(x.float(), pred, tt)
        x = deterministic_step(obj, x.float(), pred, tt, s[j].expand(n).to(dev)).to(batch.x0.dtype)
    raise AssertionError("unreachable")


def renoise(objective, x0: torch.Tensor, generator: torch.Generator, tokens: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, target, t)``: ``x0`` noised again at a time the objective's training distribution draws."""
    t = objective.sample_t(x0.shape[0], generator, tokens).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt, target = objective.noise(x0, eps, t)
    return xt, target, t


def first_nonfinite(loss: torch.Tensor, named) -> str | None:
    """What of a loss's own network's step is not finite: its ``loss``, or the first of the ``named`` parameters'
    gradients that is not (None: all are)."""
    if not torch.isfinite(loss).all():
        return f"its loss ({float(loss.detach()):g})"
    return next((f"the gradient of {name}" for name, p in named
                 if p.grad is not None and not torch.isfinite(p.grad).all()), None)


def average_gradients(params) -> None:
    """Average ``params``' gradients over the processes of a launch (a loss's own network, whose replicas must
    stay equal); nothing over one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and (n := dist.get_world_size()) > 1:
        for p in params:
            if p.grad is not None:  # SUM then divide: gloo has no AVG
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(n)
