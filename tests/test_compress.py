"""Compression invariants on a real tiny PixArtTransformer2DModel."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from slimdit.compress.lowrank import LowRankLinear, layer_shape, rank_for_ratio
from slimdit.compress.plan import Plan, apply_plan
from slimdit.models import adapter_for
from slimdit.models.storage import load_model, merge_lowrank, save_model


def tiny(num_layers: int = 4, seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=num_layers, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    caption_channels=12, use_additional_conditions=False).eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                encoder_attention_mask=torch.ones(2, 5), timestep=torch.tensor([10, 500]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


@torch.no_grad()
def out(model) -> torch.Tensor:
    return model(**inputs()).sample


def test_units_parts_and_exact_parameter_counts():
    m = tiny()
    a = adapter_for(m)
    assert a.units(m) == ["block.0", "block.1", "block.2", "block.3"]
    assert a.parts(m, "block.0") == ["self_attn", "cross_attn", "mlp"]
    assert a.block_params(m) == sum(p.numel() for p in m.transformer_blocks.parameters())
    rec = apply_plan(a, m, Plan.from_dict({"units": {"block.1": {"svd": {"mlp": 0.5}}}}))
    layer = m.transformer_blocks[1].ff.net[0].proj
    k = rank_for_ratio(64, 16, 0.5)
    assert isinstance(layer, LowRankLinear) and layer.rank == k
    assert rec.units[0].params_before - rec.units[0].params_after == (64 * 16) - k * (64 + 16) + (16 * 64) - \
        rank_for_ratio(16, 64, 0.5) * (16 + 64)
    assert rec.block_params_after == sum(p.numel() for p in m.transformer_blocks.parameters())


def test_zero_ratio_is_bit_identical():
    m, ref = tiny(), out(tiny())
    apply_plan(adapter_for(m), m, Plan.from_dict({"units": {u: {"svd": 0.0} for u in ["block.0", "block.3"]}}))
    assert torch.equal(out(m), ref)


def test_full_rank_svd_reproduces_the_layer():
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(7, 24)
    lr = LowRankLinear.from_linear(lin, 24)
    assert torch.allclose(lr(x), lin(x), atol=1e-5)
    again = LowRankLinear.from_linear(lr, 24)  # iterative re-compression at full rank changes nothing
    assert torch.allclose(again(x), lin(x), atol=1e-5)
    m = tiny()
    ref = out(m)
    apply_plan(adapter_for(m), m, Plan.from_dict({"units": {"block.2": {"svd": {p: {"rank": 16} for p in
                                                                               ["self_attn", "cross_attn"]}}}}))
    assert torch.allclose(out(m), ref, atol=1e-5)


def test_recompression_ratio_applies_to_the_current_parameters():
    from slimdit.compress.plan import rank_for

    m = tiny()
    a = adapter_for(m)
    apply_plan(a, m, Plan.from_dict({"units": {"block.1": {"svd": 0.5}}}))
    before = a.unit_params(m, "block.1")
    layers = {p: dict(a.layers(m, "block.1", p)) for p in a.parts(m, "block.1")}
    ranks = {(p, k): layer.rank for p, d in layers.items() for k, layer in d.items()}
    apply_plan(a, m, Plan.from_dict({"units": {"block.1": {"svd": 0.5}}}))  # section 4.6.3: c of P_i, again
    for (p, k), r in ranks.items():
        layer = dict(a.layers(m, "block.1", p))[k]
        assert layer.rank == max(1, int(r * 0.5)) == rank_for(layers[p][k], 0.5)
    removed = before - a.unit_params(m, "block.1")
    weights = sum(r * sum(layer_shape(layers[p][k])) for (p, k), r in ranks.items())
    assert 0.5 * weights <= removed <= 0.5 * weights + sum(sum(layer_shape(layers[p][k])) for p, k in ranks)


def test_rank_formula_is_eq_4_9():
    assert rank_for_ratio(1152, 1152, 0.78) == int(1152 * 1152 * 0.22 / 2304)
    assert rank_for_ratio(4608, 1152, 0.44) == int(4608 * 1152 * 0.56 / 5760)
    assert rank_for_ratio(8, 8, 0.999) == 1
    with pytest.raises(ValueError):
        rank_for_ratio(8, 8, 1.0)


def test_removal_equals_skipping_the_block_by_hand():
    m = tiny()
    by_hand = tiny()
    by_hand.transformer_blocks = torch.nn.ModuleList([by_hand.transformer_blocks[i] for i in (0, 3)])
    rec = apply_plan(adapter_for(m), m, Plan.from_dict({"units": {"block.1": "remove", "block.2": "remove"}}))
    assert m.config.num_layers == 2 and rec.kept_units == ["block.0", "block.3"]
    assert torch.equal(out(m), out(by_hand))


def test_save_load_roundtrips(tmp_path):
    removed = tiny()
    apply_plan(adapter_for(removed), removed, Plan.from_dict({"units": {"block.0": "remove"}}))
    save_model(removed, tmp_path / "dense")
    plain = PixArtTransformer2DModel.from_pretrained(tmp_path / "dense")  # plain diffusers
    assert plain.config.num_layers == 3 and torch.equal(out(plain), out(removed))

    low = tiny()
    apply_plan(adapter_for(low), low, Plan.from_dict({"units": {"block.1": {"svd": 0.6}, "block.2": "remove"}}))
    save_model(low, tmp_path / "low")
    assert torch.equal(out(load_model(tmp_path / "low")), out(low))
    with pytest.raises(OSError, match="no file named"):  # plain diffusers must not load random factors
        PixArtTransformer2DModel.from_pretrained(tmp_path / "low")
    merged = merge_lowrank(load_model(tmp_path / "low"))
    save_model(merged, tmp_path / "merged")
    assert torch.allclose(out(PixArtTransformer2DModel.from_pretrained(tmp_path / "merged")), out(low), atol=1e-5)


@pytest.mark.parametrize("plan, message", [
    ({"units": {"block.9": "remove"}}, "does not exist"),
    ({"units": {"layer.1": "remove"}}, "bad unit name"),
    ({"units": {"block.1": {"svd": {"mlp": 1.2}}}}, "removal fraction in \\[0, 1\\)"),
    ({"units": {"block.1": {"svd": {"ffn": 0.5}}}}, "unknown part"),
    ({"units": {"block.1": {"svd": {"mlp": {"rank": 999}}}}}, "outside"),
    ({"units": {"block.1": "prune"}}, "expected 'remove'"),
])
def test_bad_plans_fail_before_any_surgery(plan, message):
    m = tiny()
    ref = out(m)
    with pytest.raises(ValueError, match=message):
        apply_plan(adapter_for(m), m, Plan.from_dict(plan))
    assert torch.equal(out(m), ref)  # nothing was changed


def test_grasp_keeps_the_singular_directions_the_loss_uses():
    from slimdit.compress.grasp import grasp_keep

    m = tiny()
    a = adapter_for(m)
    layer = m.transformer_blocks[1].attn1.to_out[0]
    _, _, Vh = torch.linalg.svd(layer.weight.detach())
    probe = Vh[-1]  # the direction of the smallest singular value

    def loss(model):  # a loss that only sees the smallest direction of this layer
        return model.transformer_blocks[1].attn1.to_out[0](probe[None]).pow(2).sum()

    plan = Plan.from_dict({"units": {"block.1": {"svd": {"self_attn": {"rank": 2}}}}})
    keep = grasp_keep(a, m, plan, loss, batches=2)
    assert 15 in keep["block.1.attn1.to_out.0"].tolist()  # plain SVD would keep 0 and 1
    assert isinstance(m.transformer_blocks[1].attn1.to_out[0], torch.nn.Linear)  # the model is restored
    apply_plan(a, m, plan, keep=keep)
    low = m.transformer_blocks[1].attn1.to_out[0]
    assert torch.allclose(low(probe[None]) - low.up.bias, layer(probe[None]) - layer.bias, atol=1e-5)


def test_bypass_equals_removal_and_leaves_the_model_untouched():
    m, removed = tiny(), tiny()
    a = adapter_for(m)
    ref = out(m)
    apply_plan(a, removed, Plan.from_dict({"units": {"block.1": "remove", "block.3": "remove"}}))
    with a.bypassed(m, ["block.1", "block.3"]):
        assert torch.equal(out(m), out(removed))
    assert torch.equal(out(m), ref)


def test_an_unsupported_model_is_named():
    with pytest.raises(ValueError, match="no slimdit adapter for Linear; supported: flux, pixart"):
        adapter_for(torch.nn.Linear(2, 2))
