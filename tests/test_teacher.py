"""The teacher recipe on a tiny config: exact resume, export to a diffusers pipeline, seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdit.io import load_tensors
from slimdit.worlds.shapes.teacher import TeacherConfig, export_teacher, train_teacher

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, text_dim=16, batch_size=4, warmup=2,
            checkpoint_every=2, seed=3, latent_channels=4, vae_width=8, vae_steps=2, vae_check_prompts=12)
PIXEL = {**TINY, "latent_channels": 0, "patch_size": 4}  # pixel space, as runs before the autoencoder


def _final(run):
    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    return ck.name, load_tensors(ck / "model.safetensors"), load_tensors(ck / "ema.safetensors")


@pytest.mark.parametrize("recipe", [TINY, PIXEL], ids=["latent", "pixel"])
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, recipe):
    straight = train_teacher(tmp_path / "a", TeacherConfig(steps=6, **recipe))
    if recipe["latent_channels"]:  # the autoencoder stage stops and resumes too
        train_teacher(tmp_path / "b", TeacherConfig(steps=6, **recipe), max_minutes=0.0)
        assert [p.name for p in (tmp_path / "b" / "vae_checkpoints").glob("step_*")] == ["step_0000001"]
        assert not (tmp_path / "b" / "vae").exists() and not (tmp_path / "b" / "checkpoints").exists()
    train_teacher(tmp_path / "b", TeacherConfig(steps=6, **recipe), max_minutes=0.0)  # stops after one step
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("step_*")] == ["step_0000001"]
    resumed = train_teacher(tmp_path / "b", TeacherConfig(steps=6, **recipe))
    (na, ma, ea), (nb, mb, eb) = _final(straight), _final(resumed)
    assert na == nb == "step_0000006"
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
        assert torch.equal(ea[k], eb[k]), k


def test_a_run_directory_refuses_another_config(tmp_path):
    train_teacher(tmp_path, TeacherConfig(steps=1, **TINY))
    with pytest.raises(ValueError, match="another config"):
        train_teacher(tmp_path, TeacherConfig(steps=1, **{**TINY, "num_layers": 3}))


def test_weighted_recipe_resumes_exactly_and_keeps_its_text_encoder_scale(tmp_path):
    from slimdit.worlds.shapes.teacher import teacher_config

    recipe = {**TINY, "text_lr_scale": 0.0, "high_noise_weight": 10.0, "focus_share": 0.5, "focus_timesteps": 300}
    straight = train_teacher(tmp_path / "a", TeacherConfig(steps=4, **recipe))
    train_teacher(tmp_path / "b", TeacherConfig(steps=4, **recipe), max_minutes=0.0)
    resumed = train_teacher(tmp_path / "b", teacher_config(tmp_path / "b", steps=4))  # the saved recipe
    (_, ma, _), (_, mb, _) = _final(straight), _final(resumed)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    first = load_tensors(sorted((tmp_path / "b" / "checkpoints").glob("step_*"))[0] / "model.safetensors")
    text = [k for k in ma if k.startswith("text_encoder.")]
    assert text and all(torch.equal(ma[k], first[k]) for k in text)  # scale 0: the text encoder stays as it was
    with pytest.raises(ValueError, match="high_noise_weight differ"):
        teacher_config(tmp_path / "b", {"high_noise_weight": 5.0})
    with pytest.raises(ValueError, match="unknown or non-resumable teacher field"):
        teacher_config(tmp_path / "c", {"no_such_field": 1})


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    train_teacher(run, TeacherConfig(steps=2, **TINY))
    return export_teacher(run, run / "pipeline")


def test_export_is_a_plain_diffusers_pixart_sigma_pipeline(tiny_pipeline_dir):
    from diffusers import AutoencoderKL, DiffusionPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel) and pipe.transformer.config.num_layers == 2
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 4  # 8x8 latents
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    out = pipe("a red circle", num_inference_steps=2, use_resolution_binning=False, max_sequence_length=16,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def test_sampler_images_depend_on_seed_not_on_batching(tiny_pipeline_dir):
    from slimdit.pipelines.loading import load_sampler

    s = load_sampler(str(tiny_pipeline_dir), steps=3, batch_size=4)
    prompts = ["a red circle", "two squares", "a big triangle", "a blue square and a green circle", "a red circle"]
    seeds = [0, 1, 2, 3, 4]
    a = s.generate(prompts, seeds, progress=False)
    s.options.batch_size = 1
    b = s.generate(prompts, seeds, progress=False)
    assert a.dtype == np.uint8 and a.shape == (5, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched matmuls may round differently
    assert not np.array_equal(a[0], a[4])  # same prompt, different seed


@pytest.mark.slow  # data workers are for GPU runs; --runslow checks they change nothing
def test_data_workers_do_not_change_the_run(tmp_path):
    a = train_teacher(tmp_path / "a", TeacherConfig(steps=2, **TINY))
    b = train_teacher(tmp_path / "b", TeacherConfig(steps=2, data_workers=2, **TINY))
    (_, ma, _), (_, mb, _) = _final(a), _final(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_v_prediction_recipe_exports_a_v_scheduler_and_distils_with_a_v_target(tmp_path):
    from diffusers import DiffusionPipeline

    import slimdit.worlds.shapes.pixel_vae  # noqa: F401
    from slimdit.distill.objectives import DDPM
    from slimdit.models import adapter_for
    from slimdit.worlds.shapes.teacher import teacher_config

    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        teacher_config(tmp_path / "bad", {"prediction_type": "x0"})
    with pytest.raises(ValueError, match="focus_share must be in"):
        teacher_config(tmp_path / "bad", {"focus_share": 1.5})
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    run = train_teacher(tmp_path, TeacherConfig(steps=1, prediction_type="v_prediction", **TINY))
    pipe = DiffusionPipeline.from_pretrained(export_teacher(run, tmp_path / "pipeline"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert adapter_for(pipe.transformer, pipe.scheduler.config).objective.name == "v_prediction"
    with pytest.raises(ValueError, match="scheduler config"):  # never a silent epsilon
        _ = adapter_for(pipe.transformer).objective
    # the v target: x0 and eps come back from (x_t, v) exactly as the scheduler inverts them
    obj = DDPM.linear("v_prediction")
    x0, eps, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    xt, v = obj.noise(x0, eps, t)
    a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose((1 - a).sqrt() * xt + a.sqrt() * v, eps, atol=1e-5)
    assert torch.equal(DDPM.linear("epsilon").noise(x0, eps, t)[1], eps)


def test_a_run_saved_before_the_recipe_options_resumes_with_its_own_recipe(tmp_path):
    import json

    from slimdit.worlds.shapes.teacher import teacher_config

    new = ("text_lr_scale", "high_noise_weight", "prediction_type", "focus_share", "focus_timesteps",
           "latent_channels", "vae_width", "vae_steps", "vae_lr", "vae_kl_weight")
    old = {k: v for k, v in TeacherConfig(**PIXEL).__dict__.items() if k not in new}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = teacher_config(tmp_path, steps=9)
    assert (cfg.text_lr_scale, cfg.high_noise_weight, cfg.prediction_type, cfg.steps) == (1.0, 1.0, "epsilon", 9)
    assert cfg.latent_channels == 0  # pixel space
    assert cfg.focus_share == 0.0  # uniform timesteps, as such runs trained


def test_probe_inverts_both_targets_exactly_and_reports_per_timestep(tiny_pipeline_dir, tmp_path):
    from slimdit.distill.objectives import DDPM
    from slimdit.worlds.shapes.probe import probe_denoiser, x0_guess

    x0, eps, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8), torch.tensor([10, 990])
    for name in ("epsilon", "v_prediction"):
        obj = DDPM.linear(name)
        xt, target = obj.noise(x0, eps, t)
        a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
        assert torch.allclose(x0_guess(target, xt, a, name), x0, atol=1e-3), name  # the true target gives x0
    r = probe_denoiser(str(tiny_pipeline_dir), n=4, timesteps=(100, 900), out_png=tmp_path / "p.png")
    assert set(r["x0_mse"]) == {"100", "900"} and set(r["x0_mse"]["900"]) == {"cond", "uncond"}
    assert (tmp_path / "p.png").exists()


def test_pixel_space_export_keeps_the_identity_vae(tmp_path):
    from diffusers import DiffusionPipeline

    import slimdit.worlds.shapes.pixel_vae  # noqa: F401  (what a plain diffusers user imports first)
    from slimdit.worlds.shapes.pixel_vae import PixelSpaceVAE

    run = train_teacher(tmp_path, TeacherConfig(steps=1, **PIXEL))
    pipe = DiffusionPipeline.from_pretrained(export_teacher(run, tmp_path / "pipeline"))
    assert isinstance(pipe.vae, PixelSpaceVAE) and pipe.vae_scale_factor == 1


def test_the_autoencoder_records_its_scaling_and_reconstruction_ceiling(tmp_path):
    import json

    from diffusers import AutoencoderKL

    from slimdit.worlds.shapes.teacher import teacher_config

    train_teacher(tmp_path, TeacherConfig(steps=1, **TINY))
    q = json.loads((tmp_path / "vae_quality.json").read_text())
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(1.0 / q["latent_std"])
    assert q["steps"] == 2 and 0 <= q["reconstruction_geneval_accuracy"] <= 1 and q["reconstruction_prompts"] == 12
    # the check's prompts may change under a run (it only measures): a resumed run keeps its recipe
    assert teacher_config(tmp_path, vae_check_prompts=300).vae_check_prompts == 300
    with pytest.raises(ValueError, match="vae_check_prompts must be at least 1, got 0"):
        teacher_config(tmp_path, vae_check_prompts=0)


@pytest.mark.parametrize("limit", [6, 12, 200, 299])
def test_the_reconstruction_check_spreads_its_prompts_over_every_category(limit):
    from slimdit.worlds.shapes.autoencoder import check_prompts
    from slimdit.worlds.shapes.prompts import CATEGORIES, eval_prompts

    chosen = check_prompts(limit)
    assert len(set(chosen)) == limit and {p.category for p in chosen} == set(CATEGORIES)
    assert check_prompts(None) == check_prompts(300) == eval_prompts()


def test_a_branch_that_changes_nothing_ends_where_the_straight_run_ends(tmp_path):
    from slimdit.io import read_json
    from slimdit.worlds.shapes.teacher import branch_run

    straight = train_teacher(tmp_path / "a", TeacherConfig(steps=5, **TINY))
    train_teacher(tmp_path / "src", TeacherConfig(steps=3, **TINY))
    cfg = branch_run(tmp_path / "src", tmp_path / "b", {"steps": 5})
    branched = train_teacher(tmp_path / "b", cfg)
    (na, ma, ea), (nb, mb, eb) = _final(straight), _final(branched)
    assert na == nb == "step_0000005"
    assert all(torch.equal(ma[k], mb[k]) and torch.equal(ea[k], eb[k]) for k in ma)
    assert read_json(tmp_path / "b" / "branch.json") == {"source": str(tmp_path / "src"), "step": 3,
                                                          "changed": {"steps": 5}}


def test_annealing_falls_from_lr_to_zero_and_a_branch_refuses_what_it_may_not_change(tmp_path):
    from slimdit.worlds.shapes.teacher import branch_run, lr_factor

    cfg = TeacherConfig(steps=100, warmup=10, anneal_start=60)
    f = [lr_factor(cfg, s) for s in range(100)]
    assert f[9:61] == [1.0] * 52 and all(a > b for a, b in zip(f[60:], f[61:])) and 0 < f[99] < 1e-2
    assert f[80] == pytest.approx(0.5)
    constant = TeacherConfig(steps=100, warmup=10)
    assert [lr_factor(constant, s) for s in range(9, 100)] == [1.0] * 91

    with pytest.raises(FileNotFoundError, match="does not exist"):  # a wrong --from path, named
        branch_run(tmp_path / "no-such-run", tmp_path / "b", {"steps": 4})
    train_teacher(tmp_path / "src", TeacherConfig(steps=2, **TINY))
    with pytest.raises(FileNotFoundError, match="step_0000001"):
        branch_run(tmp_path / "src", tmp_path / "b", {"steps": 4}, step=1)
    with pytest.raises(ValueError, match="may not change num_layers"):
        branch_run(tmp_path / "src", tmp_path / "b", {"num_layers": 3, "steps": 4})
    with pytest.raises(ValueError, match="before the branch point"):
        branch_run(tmp_path / "src", tmp_path / "b", {"anneal_start": 1, "steps": 4})
    with pytest.raises(ValueError, match="more steps"):
        branch_run(tmp_path / "src", tmp_path / "b", {"anneal_start": 0})
    assert not (tmp_path / "b").exists()  # nothing written before the checks pass
    cfg = branch_run(tmp_path / "src", tmp_path / "b", {"anneal_start": 2, "steps": 4})
    annealed = train_teacher(tmp_path / "b", cfg)
    plain = train_teacher(tmp_path / "c", TeacherConfig(steps=4, **TINY))
    (_, ma, _), (_, mb, _) = _final(annealed), _final(plain)
    assert any(not torch.equal(ma[k], mb[k]) for k in ma)  # the anneal changed the steps after the branch
    with pytest.raises(FileExistsError, match="already holds a run"):
        branch_run(tmp_path / "src", tmp_path / "b", {"steps": 6})
