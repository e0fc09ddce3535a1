"""The Flux adapter on a real tiny FluxTransformer2DModel (1 double + 1 single block), the rectified-flow objective,
and table 4.2's parameter counts at the real Flux-dev config on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from slimdit.compress.plan import Plan, apply_plan
from slimdit.distill.objectives import DDPM, RectifiedFlow, objective_for
from slimdit.models import adapter_for
from slimdit.models.flux import pack, unpack
from slimdit.models.storage import load_model, save_model

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_flux(layers: int = 1, single: int = 1, guidance: bool = True, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  pooled_projection_dim=10, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)).eval()


def cond(b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(b, 5, 12, generator=g),
            "pooled_prompt_embeds": torch.randn(b, 10, generator=g)}


def x(b: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))  # 4 latent channels, 16 tokens


def flux_data(seed: int, n: int = 8):
    """Cached training inputs for the tiny Flux: latents, T5 sequence and CLIP pooled vector, and the null form."""
    from slimdit.distill.trainer import Conditioning

    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(n, 4, 8, 8, generator=g),
                        {"prompt_embeds": torch.randn(n, 5, 12, generator=g),
                         "pooled_prompt_embeds": torch.randn(n, 10, generator=g)},
                        {"prompt_embeds": torch.zeros(1, 5, 12), "pooled_prompt_embeds": torch.zeros(1, 10)})


@torch.no_grad()
def out(model) -> torch.Tensor:
    return adapter_for(model).predict(model, x(), torch.tensor([100.0, 900.0]), cond())


def test_units_parts_and_packing():
    m = tiny_flux(2, 3)
    a = adapter_for(m, FLOW)
    assert a.name == "flux" and a.units(m) == ["double.0", "double.1", "single.0", "single.1", "single.2"]
    assert a.parts(m, "double.0") == ["img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod"]
    assert a.parts(m, "single.1") == ["attn", "mlp", "proj_out", "mod"]
    for u in a.units(m):  # every part names real linear layers
        assert all(isinstance(layer, torch.nn.Linear) for p in a.parts(m, u) for layer in a.layers(m, u, p).values())
    assert a.block_params(m) == sum(p.numel() for p in [*m.transformer_blocks.parameters(),
                                                        *m.single_transformer_blocks.parameters()])
    lat = x()
    assert pack(lat).shape == (2, 16, 16) and torch.equal(unpack(pack(lat), 8, 8), lat)
    assert out(m).shape == lat.shape


def test_zero_compression_is_bit_identical_and_full_rank_svd_reproduces():
    ref = out(tiny_flux())
    m = tiny_flux()
    apply_plan(adapter_for(m), m, Plan.from_dict({"units": {"double.0": {"svd": 0.0}, "single.0": {"svd": 0.0}}}))
    assert torch.equal(out(m), ref)
    m = tiny_flux()
    full = {"double.0": {"svd": {p: {"rank": 16} for p in ["img_attn", "txt_attn", "img_mod", "txt_mod"]}},
            "single.0": {"svd": {p: {"rank": 16} for p in ["attn", "mlp", "proj_out", "mod"]}}}
    apply_plan(adapter_for(m), m, Plan.from_dict({"units": full}))
    assert torch.allclose(out(m), ref, atol=1e-5)


@pytest.mark.parametrize("unit", ["double.1", "single.0", "single.1"])
def test_removal_equals_bypass_on_both_streams_and_loads_in_plain_diffusers(tmp_path, unit):
    m = tiny_flux(2, 2)
    a = adapter_for(m)
    with a.bypassed(m, [unit]):
        bypassed = out(m)
    assert not torch.equal(bypassed, out(m))  # the unit did something
    apply_plan(a, m, Plan.from_dict({"units": {unit: "remove"}}))
    assert torch.equal(out(m), bypassed)
    save_model(m, tmp_path / "t")
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "t")  # plain diffusers
    assert (plain.config.num_layers, plain.config.num_single_layers) == (len(m.transformer_blocks),
                                                                         len(m.single_transformer_blocks))
    assert torch.equal(out(plain), bypassed)


def test_lowrank_student_roundtrips(tmp_path):
    m = tiny_flux()
    apply_plan(adapter_for(m), m, Plan.from_dict({"units": {"double.0": {"svd": 0.5}, "single.0": {"svd": 0.5}}}))
    save_model(m, tmp_path / "t")
    assert torch.equal(out(load_model(tmp_path / "t")), out(m))


def test_capture_reads_both_streams_in_the_right_places():
    m = tiny_flux()
    a = adapter_for(m)
    with torch.no_grad(), a.capture(m) as feats:
        out(m)
    assert feats["double.0"]["image"].shape == (2, 16, 16) and feats["double.0"]["text"].shape == (2, 5, 16)
    assert feats["single.0"]["image"].shape == (2, 16, 16) and feats["single.0"]["text"].shape == (2, 5, 16)
    assert len(a.features(feats, ["double.0", "single.0"])) == 4  # each (unit, stream) is one feature of eq. 4.11
    m.train().enable_gradient_checkpointing()  # diffusers then calls the blocks positionally
    with a.capture(m) as ck:
        a.predict(m, x(), torch.tensor([100.0, 900.0]), cond()).sum().backward()
    assert torch.allclose(ck["single.0"]["image"], feats["single.0"]["image"], atol=1e-6)


def _kd_terms(teacher, student, sched, data, kept, tmp_path):
    from slimdit.distill.trainer import TrainConfig, Trainer

    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1, kd="normalized_hybrid", caption_dropout=0.0)
    t = Trainer(adapter_for(student, sched), teacher, student, data, cfg, tmp_path, kept)
    return {k: v.item() for k, v in t._micro_step(0, 0).items()}


def test_kd_loss_of_a_copy_is_zero_for_flux_and_pixart(tmp_path):
    from tests.test_trainer import SCHED, _data
    from tests.test_trainer import _student as pixart_student

    teacher = tiny_flux(2, 2)
    data = flux_data(3)
    units = adapter_for(teacher).units(teacher)
    same = _kd_terms(teacher, copy.deepcopy(teacher), FLOW, data, units, tmp_path / "flux")
    assert same["out"] == 0 and same["feat"] == 0 and same["task"] > 0
    student = copy.deepcopy(teacher)  # a wrong stream somewhere would show here: one removed unit is not zero
    rec = apply_plan(adapter_for(student), student, Plan.from_dict({"units": {"single.0": "remove"}}))
    assert _kd_terms(teacher, student, FLOW, data, rec.kept_units, tmp_path / "flux2")["feat"] > 0

    pt, _, _ = pixart_student()
    same = _kd_terms(pt, copy.deepcopy(pt), SCHED, _data(), adapter_for(pt).units(pt), tmp_path / "pixart")
    assert same["out"] == 0 and same["feat"] == 0 and same["task"] > 0


def test_flux_training_resumes_bit_identical(tmp_path):
    from slimdit.distill.trainer import TrainConfig, Trainer

    data = flux_data(4)
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=1, lr=1e-3, grad_clip=1.0, checkpoint_every=2,
                      log_every=1)

    def trainer(run):
        teacher = tiny_flux(2, 2)
        student = copy.deepcopy(teacher)
        rec = apply_plan(adapter_for(student), student, Plan.from_dict({"units": {"double.1": "remove",
                                                                                 "single.0": {"svd": 0.5}}}))
        return Trainer(adapter_for(student, FLOW), teacher, student, data, cfg, run, rec.kept_units)

    a = trainer(tmp_path / "a")
    a.train(progress=False)
    trainer(tmp_path / "b").train(max_steps=2, progress=False)
    b = trainer(tmp_path / "b")
    b.train(progress=False)
    for (n, p), (_, q) in zip(a.student_model().named_parameters(), b.student_model().named_parameters()):
        assert torch.equal(p, q), n


def test_table_4_2_parameter_counts_at_the_real_flux_dev_config():
    with torch.device("meta"):
        m = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are Flux-dev's dimensions
    a = adapter_for(m)
    assert len(a.units(m)) == 19 + 38
    assert round(a.unit_params(m, "double.0") / 1e6, 1) == 339.8
    assert round(a.unit_params(m, "single.0") / 1e6, 1) == 141.6
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 11901.4
    linear1 = sum(layer.weight.numel() + layer.bias.numel() for p in ("attn", "mlp")
                  for layer in a.layers(m, "single.0", p).values())
    assert round(linear1 / 1e6, 1) == 66.1  # the thesis' fused "linear1" is attn (q, k, v) + mlp


def test_objectives_come_from_the_scheduler_config():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    with pytest.raises(ValueError, match="no scheduler config"):
        objective_for(None)
    flow = objective_for(FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLOW.items() if k[0] != "_"}).config)
    assert isinstance(flow, RectifiedFlow) and flow.dynamic
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1.0, 500.0, 999.0])
    xt, v = flow.noise(x0, eps, t)
    assert torch.equal(v, eps - x0) and torch.allclose(flow.x0(xt, v, t), x0, atol=1e-5)
    # the dynamic shift is the pipeline's: sigma' = e^mu / (e^mu + 1/sigma - 1), mu from the image token count
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    s = torch.tensor([0.25, 0.5])
    assert torch.allclose(flow._shift(s.double(), 1024).float(), (torch.e ** mu / (torch.e ** mu + 1 / s - 1)))
    t = flow.sample_t(1000, torch.Generator().manual_seed(0), tokens=1024)
    assert 0 < t.min() and t.max() <= 1000 and t.median() > 500  # shifted towards noise, as sampling is
    saved_lcm = {"_class_name": "FlowMatchLCMScheduler", "shift": 1.0, "num_train_timesteps": 1000}
    assert isinstance(objective_for(saved_lcm), RectifiedFlow)  # every flow-matching scheduler, by its class
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        objective_for({**FLOW, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="names no betas"):
        objective_for({"_class_name": "DDPMScheduler"})
    ddpm = objective_for({"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"})
    assert isinstance(ddpm, DDPM) and ddpm.name == "v_prediction"
    assert not torch.allclose(ddpm.alphas_cumprod, DDPM.linear().alphas_cumprod)  # the config's betas, not linear
    xt, v = ddpm.noise(x0, eps, t.long()[:3])
    assert torch.allclose(ddpm.x0(xt, v, t.long()[:3]), x0, atol=1e-4)


def test_grasp_selects_singular_values_of_both_block_kinds_by_the_flow_loss():
    from slimdit.compress.grasp import grasp_keep

    m = tiny_flux()
    a = adapter_for(m, FLOW)
    obj = a.objective
    g = torch.Generator().manual_seed(5)
    x0, eps = x(), torch.randn(2, 4, 8, 8, generator=g)
    t = obj.sample_t(2, g, 16)
    xt, target = obj.noise(x0, eps, t)

    def loss(model):  # the flow objective's velocity MSE on a calibration batch
        return (a.predict(model, xt, t, cond()) - target).pow(2).mean()

    plan = Plan.from_dict({"units": {"double.0": {"svd": {"img_mlp": 0.5}}, "single.0": {"svd": {"mlp": 0.5}}}})
    keep = grasp_keep(a, m, plan, loss, batches=1)
    assert set(keep) == {"double.0.ff.net.0.proj", "double.0.ff.net.2", "single.0.proj_mlp"}
    apply_plan(a, m, plan, keep=keep)
    assert torch.isfinite(out(m)).all()


def test_guidance_distillation_refuses_a_teacher_that_already_takes_guidance():
    from slimdit.distill.guidance import GuidanceLoss
    from slimdit.distill.losses import Batch

    guided = tiny_flux(guidance=True)
    a = adapter_for(guided, FLOW)
    loss = GuidanceLoss(a, {k: v[:1] * 0 for k, v in cond().items()})
    batch = Batch(x(), cond(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="teacher takes it: True"):
        loss(guided, guided, batch)
    with pytest.raises(ValueError, match="student: False"):
        loss(tiny_flux(guidance=False), tiny_flux(guidance=False), batch)


def test_published_recipes_weigh_their_terms_as_published(tmp_path):
    from slimdit.distill.losses import PRESETS

    teacher = tiny_flux(2, 2)
    data = flux_data(3)
    student = copy.deepcopy(teacher)
    rec = apply_plan(adapter_for(student), student, Plan.from_dict({"units": {"double.1": {"svd": 0.5},
                                                                              "single.1": {"svd": 0.5}}}))
    from slimdit.distill.trainer import TrainConfig, Trainer

    def terms(kd):
        cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1, kd=kd, caption_dropout=0.0)
        t = Trainer(adapter_for(student, FLOW), teacher, student, data, cfg, tmp_path / kd, rec.kept_units)
        return {k: v.item() for k, v in t._micro_step(0, 0).items()}

    tf, fm, hy = terms("tinyfusion"), terms("flux_mini"), terms("hybrid")
    assert tf["feat"] == 0 and tf["total"] == pytest.approx(0.1 * tf["task"] + 0.9 * tf["out"], rel=1e-6)
    assert fm["out"] == pytest.approx(hy["out"]) and fm["feat"] != pytest.approx(hy["feat"])
    p = PRESETS["flux_mini"]
    assert dict(p.group_weights) == {"single": 0.05} and p.streams == ("image",)
