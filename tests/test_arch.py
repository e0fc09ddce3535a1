"""Random-weight models at the real dimensions (``arch:NAME``): component counts from configs alone, inputs of the
real shapes, and the real-dims bench of a plan's student against the unmodified model."""

from __future__ import annotations

import json

import pytest

from slimdit.cli import main
from slimdit.compress.plan import Plan
from slimdit.models.arch import build_component, component_params, parse_blocks, scheduler_config


def test_component_counts_at_the_real_dimensions_without_a_download():
    pixart = component_params("arch:pixart-sigma-xl")
    flux = component_params("arch:flux-dev")
    assert round(flux["transformer"] / 1e6, 1) == 11901.4  # thesis table 4.2
    assert round(pixart["transformer"] / 1e6) == 611  # PixArt-Sigma-XL: 0.6 B
    assert round(pixart["text_encoder"] / 1e6) == round(flux["text_encoder_2"] / 1e6) == 4762  # T5-XXL's encoder
    assert round(flux["text_encoder"] / 1e6, 1) == 123.1  # CLIP ViT-L/14's text model
    assert round(pixart["vae"] / 1e6, 1) == 83.7 and round(flux["vae"] / 1e6, 1) == 83.8
    assert scheduler_config("arch:flux-dev")["use_dynamic_shifting"]
    assert scheduler_config("arch:pixart-sigma-xl")["prediction_type"] == "epsilon"
    from slimdit.models.arch import arch_spec

    vae = build_component(arch_spec("arch:flux-dev"), "vae")
    assert vae.config.latent_channels == 16 and next(vae.parameters()).device.type == "meta"


def test_blocks_and_unknown_names_are_checked():
    assert parse_blocks("2") == 2 and parse_blocks("double=2,single=4") == {"double": 2, "single": 4}
    with pytest.raises(ValueError, match="group=N"):
        parse_blocks("two")
    with pytest.raises(ValueError, match="known: arch:flux-dev, arch:pixart-sigma-xl"):
        component_params("arch:sd3")
    with pytest.raises(ValueError, match="groups double, single"):
        from slimdit.models.arch import build_transformer

        build_transformer("arch:flux-dev", {"block": 2}, device="meta")


@pytest.mark.slow  # 3 benches at 1152 wide; test_bench_cli_on_an_arch_model runs the same path in the default suite
def test_the_real_dims_bench_compares_a_plan_with_the_unmodified_model():
    from slimdit.speed.arch import bench_arch

    svd = Plan.from_dict({"units": {"block.0": {"svd": {"self_attn": {"rank": 128}, "cross_attn": {"rank": 128},
                                                        "mlp": {"rank": 512}}}}})
    r = bench_arch("arch:pixart-sigma-xl", svd, blocks=1, resolution=128, repeats=1, profile=True)
    assert r.blocks == {"block": 1} and 0 < r.flop_ratio < 0.8 and r.param_ratio < 1 and r.peak_memory_ratio < 1
    assert r.student["block_param_ratio"] < 0.45 and r.latency_ratio > 0
    assert {"matmul", "attention"} <= set(r.profile["teacher"])
    same = bench_arch("arch:pixart-sigma-xl", Plan.from_dict({"units": {}}), blocks=1, resolution=128, repeats=1)
    assert same.flop_ratio == same.param_ratio == same.peak_memory_ratio == 1.0  # zero compression: identical
    rm = bench_arch("arch:pixart-sigma-xl", Plan.from_dict({"units": {"block.1": "remove"}}), blocks=2,
                    resolution=128, repeats=1)
    assert rm.student["block_params"] * 2 == rm.teacher["block_params"] and rm.flop_ratio < 0.8


def test_bench_cli_on_an_arch_model(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("units:\n  block.0: {svd: 0.5}\n")
    assert main(["bench", "--model", "arch:pixart-sigma-xl", "--blocks", "1", "--resolution", "128", "--plan",
                 str(plan), "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flop_ratio"] < 1 and out["resolution"] == 128
    assert main(["bench", "--model", "arch:pixart-sigma-xl", "--blocks", "1"]) == 2  # no plan
    assert "give --plan PLAN" in capsys.readouterr().err
    plan.write_text("units:\n  block.5: remove\n")
    assert main(["bench", "--model", "arch:pixart-sigma-xl", "--blocks", "1", "--plan", str(plan)]) == 2
    assert "block.5" in capsys.readouterr().err
    assert main(["eval", "--model", "arch:pixart-sigma-xl", "--limit", "1"]) == 2
    assert "bench" in capsys.readouterr().err
