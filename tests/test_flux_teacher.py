"""The shapes-flux recipe at a tiny size: autoencoder, CFG base by rectified flow (resumable, exact), export as a
FluxPipeline that samples with true CFG, then guidance distillation into a one-pass guidance-embedded model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from slimdit.worlds.shapes.flux_teacher import (
    FluxTeacherConfig,
    export_flux_base,
    guidance_distill,
    guided_student,
    train_flux_base,
)

TINY = dict(double=1, single=1, heads=2, head_dim=8, t5_dim=16, t5_layers=1, clip_dim=16, vae_width=8, vae_steps=2,
            batch_size=4, checkpoint_every=2, warmup=1, vae_check_prompts=12)


def _weights(run):
    from slimdit.io import load_tensors

    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    return ck.name, load_tensors(ck / "model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-teacher")
    run = train_flux_base(d / "run", FluxTeacherConfig(steps=4, **TINY))
    return run, export_flux_base(run, d / "base")


def test_base_resumes_exactly_and_samples_with_true_cfg(base, tmp_path):
    from slimdit.metrics.evaluate import _guidance as _recorded_guidance
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler

    run, out = base
    train_flux_base(tmp_path / "r", FluxTeacherConfig(steps=2, **TINY))  # stopped at step 2 ...
    train_flux_base(tmp_path / "r", FluxTeacherConfig(steps=4, **TINY))  # ... and resumed to 4
    (name_a, a), (name_b, b) = _weights(run), _weights(tmp_path / "r")
    assert name_a == name_b == "step_0000004" and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "slimdit.json").read_text())["sampling"]["true_cfg_scale"] == 3.5
    pipe = load_pipeline(str(out), "cpu")
    assert type(pipe).__name__ == "FluxPipeline" and not pipe.transformer.config.guidance_embeds
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, k: calls.append(k["hidden_states"].shape[0]),
                                               with_kwargs=True)
    images = pipeline_sampler(pipe, str(out), steps=2).generate(["a red circle", "two squares"], [0, 1])
    assert images.shape == (2, 32, 32, 3) and len(calls) == 4  # true CFG: two passes per step
    # --guidance reaches the base's true CFG (its guidance_scale input does not exist): 1 turns it off, 5 sets it
    calls.clear()
    pipeline_sampler(pipe, str(out), steps=2, guidance=1.0).generate(["a red circle"], [0])
    assert len(calls) == 2
    calls.clear()
    s5 = pipeline_sampler(pipe, str(out), steps=2, guidance=5.0)
    s5.generate(["a red circle"], [0])
    assert s5.options.extra["true_cfg_scale"] == 5.0 and len(calls) == 4  # guided: two passes per step
    # and an evaluation records the scale it really guided with, not the unused guidance_scale (1)
    assert s5.options.guidance_scale == 1.0 and _recorded_guidance(s5, s5.options) == 5.0


def test_guided_student_starts_as_the_base_and_distils_to_one_pass(base, tmp_path):
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler

    _, out = base
    teacher = load_pipeline(str(out), "cpu").transformer
    student = guided_student(teacher)
    a = adapter_for(student)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([300.0, 800.0])
    cond = {"prompt_embeds": torch.randn(2, 16, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 16, generator=g)}
    with torch.no_grad():
        assert torch.equal(a.predict(student, x, t, {**cond, "guidance": torch.tensor([1.0, 4.0])}),
                           a.predict(teacher, x, t, cond))
    guided = guidance_distill(out, tmp_path / "g", tmp_path / "shapes-flux", data="shapes-train:8",
                              train={"steps": 3, "batch_size": 2, "warmup_steps": 1, "log_every": 1},
                              progress=False)
    rows = [json.loads(r) for r in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["guided"] > 0 for r in rows)
    pipe = load_pipeline(str(guided), "cpu")
    assert pipe.transformer.config.guidance_embeds
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, k: calls.append(k["guidance"]), with_kwargs=True)
    images = pipeline_sampler(pipe, str(guided), steps=2).generate(["a red circle"], [0])
    assert images.shape == (1, 32, 32, 3) and len(calls) == 2 and float(calls[0][0]) == 3.5  # one pass per step
    # its checkpoints are continued only from what made them: another guidance range or rate is refused by name
    train = {"steps": 3, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
    for change, line in [({"w_range": (1.0, 4.0)}, "made from other inputs; restore them or choose another run "
                                                    "directory:\n  w_range: [1.0, 5.0] -> [1.0, 4.0]"),
                         ({"train": {**train, "lr": 1e-3}}, "directory:\n  train.lr: 0.0001 -> 0.001")]:
        with pytest.raises(ValueError, match=re.escape(line) + "$"):
            guidance_distill(out, tmp_path / "g", tmp_path / "other", data="shapes-train:8",
                             **{"train": train, **change}, progress=False)
    assert not (tmp_path / "other").exists()
    from slimdit.worlds.shapes.flux_teacher import _claim_guidance_run

    record = json.loads((tmp_path / "g" / "made_by.json").read_text())
    (tmp_path / "g" / "made_by.json").unlink()  # checkpoints from before the record: continued, and recorded
    _claim_guidance_run(tmp_path / "g", out, "shapes-train:8", (1.0, 5.0), {"lr": 1e-3})
    assert json.loads((tmp_path / "g" / "made_by.json").read_text())["train"] == {"lr": 1e-3} != record["train"]


def test_a_resumed_run_keeps_its_recipe(base):
    from slimdit.worlds.shapes.flux_teacher import flux_config

    run, _ = base
    assert flux_config(run, {"steps": 9, "threads": 1}).steps == 9  # how long and how fast may change
    with pytest.raises(ValueError, match="another recipe \\(lr differ"):
        flux_config(run, {"lr": 1e-3})
    with pytest.raises(ValueError, match="unknown shapes-flux recipe field"):
        flux_config(run, {"lrr": 1e-3})


def test_a_run_saved_before_a_recipe_field_existed_resumes_with_its_default(tmp_path):
    """A run directory whose config.json predates a field (v3's has no t5_from) resumes; training re-checks the
    whole recipe, so a missing field must read as its default, not as a change."""
    from dataclasses import asdict

    from slimdit.io import read_json, write_json
    from slimdit.worlds.shapes.flux_teacher import FluxTeacherConfig, flux_config

    old = {k: v for k, v in asdict(FluxTeacherConfig(steps=9)).items() if k not in ("t5_from", "freeze_t5")}
    write_json(tmp_path / "config.json", old)
    cfg = flux_config(tmp_path, asdict(FluxTeacherConfig(steps=9, threads=1)))
    assert not cfg.t5_from and not cfg.freeze_t5 and cfg.threads == 1
    with pytest.raises(ValueError, match="another recipe \\(freeze_t5 differ"):
        flux_config(tmp_path, {"freeze_t5": True})
    assert "t5_from" not in read_json(tmp_path / "config.json")  # reading changed nothing on disk


def test_a_branch_that_changes_nothing_ends_where_the_straight_run_ends_and_an_anneal_branch_is_checked(base,
                                                                                                        tmp_path):
    from slimdit.io import read_json
    from slimdit.worlds.shapes.flux_teacher import branch_flux_run, flux_config

    run, _ = base  # the straight run: 4 steps
    train_flux_base(tmp_path / "src", FluxTeacherConfig(steps=2, **TINY))
    cfg = branch_flux_run(tmp_path / "src", tmp_path / "b", {"steps": 4})
    train_flux_base(tmp_path / "b", cfg)
    (name_a, a), (name_b, b) = _weights(run), _weights(tmp_path / "b")
    assert name_a == name_b == "step_0000004" and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(tmp_path / "b" / "branch.json") == {"source": str(tmp_path / "src"), "step": 2,
                                                          "changed": {"steps": 4}}
    with pytest.raises(ValueError, match="may not change double"):
        branch_flux_run(tmp_path / "src", tmp_path / "c", {"double": 2, "steps": 4})
    with pytest.raises(ValueError, match="before the branch point"):
        branch_flux_run(tmp_path / "src", tmp_path / "c", {"anneal_start": 1, "steps": 4})
    with pytest.raises(ValueError, match="between 0 and steps"):
        branch_flux_run(tmp_path / "src", tmp_path / "c", {"anneal_start": 5, "steps": 4})
    assert not (tmp_path / "c").exists()  # nothing written before the checks pass
    cfg = branch_flux_run(tmp_path / "src", tmp_path / "c", {"anneal_start": 3, "steps": 5, "lr": 4e-4})
    assert (cfg.anneal_start, cfg.steps, cfg.lr) == (3, 5, 4e-4)
    with pytest.raises(ValueError, match="steps"):  # an anneal ends at its steps: it cannot be lengthened
        flux_config(tmp_path / "c", {"steps": 9})
    # a branch may go on learning the posterior means instead of draws; only that changes, and it changes the run
    cfg = branch_flux_run(tmp_path / "src", tmp_path / "m", {"steps": 4, "latents": "mean"})
    train_flux_base(tmp_path / "m", cfg)
    _, m = _weights(tmp_path / "m")
    assert not all(torch.equal(a[k], m[k]) for k in a)
    with pytest.raises(ValueError, match="latents must be 'sample' or 'mean'"):
        flux_config(tmp_path / "new", {"latents": "mode"})


def test_a_base_can_start_from_a_trained_t5_and_keep_it_frozen(base, tmp_path):
    from slimdit.io import load_tensors
    from slimdit.worlds.shapes.flux_teacher import pretrained_t5

    _, out = base  # a FluxPipeline whose T5 is text_encoder_2
    source = load_tensors(out / "text_encoder_2" / "model.safetensors")
    cfg = FluxTeacherConfig(steps=2, t5_from=str(out), freeze_t5=True, **TINY)
    _, w = _weights(train_flux_base(tmp_path / "r", cfg))
    t5 = {k.removeprefix("text_encoder_2."): v for k, v in w.items() if k.startswith("text_encoder_2.")}
    shared = [k for k in source if k in t5]
    assert len(shared) == len(source) and all(torch.equal(t5[k], source[k]) for k in shared)
    with pytest.raises(ValueError, match="freeze_t5 needs t5_from"):
        train_flux_base(tmp_path / "x", FluxTeacherConfig(steps=2, freeze_t5=True, **TINY))
    with pytest.raises(ValueError, match="width 16 and 1 layers"):
        pretrained_t5(FluxTeacherConfig(t5_from=str(out), **{**TINY, "t5_dim": 32}))
    with pytest.raises((FileNotFoundError, ValueError), match="not a pipeline"):
        pretrained_t5(FluxTeacherConfig(t5_from=str(out / "vae"), **TINY))


def test_pooled_dropout_empties_only_clips_captions(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from slimdit.worlds.shapes.flux_teacher import flux_config

    seen = []
    encode = FluxPipeline.encode_prompt

    def spy(self, prompt, prompt_2=None, **kw):
        seen.append((list(prompt), list(prompt_2 if prompt_2 is not None else prompt)))
        return encode(self, prompt, prompt_2=prompt_2, **kw)

    monkeypatch.setattr(FluxPipeline, "encode_prompt", spy)
    tiny = {**TINY, "batch_size": 32, "caption_dropout": 0.0}
    train_flux_base(tmp_path / "zero", FluxTeacherConfig(steps=1, **tiny))
    clip, t5 = seen[-1]
    assert clip == t5 and all(t5)  # at 0 CLIP and T5 read the same captions
    train_flux_base(tmp_path / "half", FluxTeacherConfig(steps=1, pooled_dropout=0.5, **tiny))
    clip, t5 = seen[-1]
    assert all(t5)  # T5 keeps every caption ...
    dropped = [c == "" for c in clip]
    assert 0 < sum(dropped) < len(clip)  # ... while CLIP reads the empty caption for some of them
    assert all(c == t for c, t, d in zip(clip, t5, dropped) if not d)
    with pytest.raises(ValueError, match="pooled_dropout must lie in"):
        flux_config(tmp_path / "new", {"pooled_dropout": 1.0})


def test_the_empty_pooled_ablation_gives_every_prompt_the_empty_captions_pooled_vector(base, tmp_path):
    from slimdit.pipelines.loading import load_pipeline

    run, out = base
    ablated = export_flux_base(run, tmp_path / "ablated", empty_pooled=True)
    plain, abl = load_pipeline(str(out), "cpu"), load_pipeline(str(ablated), "cpu")
    prompts = ["a red circle", "two squares", ""]
    with torch.no_grad():
        t5_p, pooled_p, _ = plain.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
        t5_a, pooled_a, _ = abl.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    assert not torch.allclose(pooled_p[0], pooled_p[2])  # the trained CLIP tells the prompts apart ...
    assert torch.allclose(pooled_a, pooled_p[2].expand_as(pooled_a), atol=1e-6)  # ... the ablation does not
    assert torch.equal(t5_a, t5_p)  # and T5 is untouched
    assert "ablation" in json.loads((ablated / "slimdit.json").read_text())


def test_qk_norm_init_starts_every_query_and_key_norm_there_and_nothing_else(tmp_path):
    from slimdit.worlds.shapes.flux import build_transformer
    from slimdit.worlds.shapes.flux_teacher import flux_config, scale_qk_norms

    cfg = FluxTeacherConfig(**TINY)
    a, b = build_transformer(cfg.shape()), build_transformer(cfg.shape())
    b.load_state_dict(a.state_dict())
    assert scale_qk_norms(b, 1.5) == 4 + 2  # the double block's four (both streams), the single block's two
    sa, sb = a.state_dict(), b.state_dict()
    changed = sorted(k for k in sa if not torch.equal(sa[k], sb[k]))
    assert changed and all(k.split(".")[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") for k in changed)
    assert all(torch.all(sb[k] == 1.5) for k in changed)
    # in a run: after two steps (AdamW moves a weight by about lr = 8e-4 a step) the norms sit at the recipe's value
    from slimdit.io import load_tensors

    run = train_flux_base(tmp_path / "qk", FluxTeacherConfig(steps=2, qk_norm_init=1.5, **TINY))
    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    for name in ("model", "ema"):  # the EMA copy starts from the scaled weights too
        w = load_tensors(ck / f"{name}.safetensors")
        qk = [v for k, v in w.items() if k.startswith("transformer.") and k.split(".")[-2] in ("norm_q", "norm_k")]
        assert len(qk) == 4 and all(torch.allclose(v, torch.full_like(v, 1.5), atol=0.01) for v in qk), name
    with pytest.raises(ValueError, match="qk_norm_init must be positive"):
        flux_config(tmp_path / "new", {"qk_norm_init": 0.0})


def test_a_few_step_student_of_the_true_cfg_base_distils_its_guidance_and_samples_in_one_pass(base, tmp_path,
                                                                                            monkeypatch):
    # the base guides by true CFG (guidance_scale 1, true_cfg_scale 3.5): the steps run must take 3.5 as the
    # teacher's guidance, and the student must not guide again on top of the guidance distilled into it
    import yaml

    import slimdit.distill.fewstep as fewstep
    from slimdit.cli import main
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler, sampling_defaults

    _, out = base
    pipe = load_pipeline(str(out), "cpu")
    assert adapter_for(pipe.transformer).guidance_scale(pipe.transformer, sampling_defaults(str(out))) == 3.5
    seen, real = [], fewstep.LOSSES["progressive"]

    def spy(r):
        seen.append((r.w, r.cfg_null is not None))
        return real(r)

    monkeypatch.setitem(fewstep.LOSSES, "progressive", spy)
    cfg = {"teacher": str(out), "out": str(tmp_path / "run"), "steps": 2, "start": 4,
           "data": {"real": "shapes-train:8"}, "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1},
           "eval": {"benchmark": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    assert seen[0] == (3.5, True)  # the first halving's targets are the base's true-CFG steps
    student = str(tmp_path / "run" / "student")
    sampling = json.loads((tmp_path / "run" / "student" / "slimdit.json").read_text())["sampling"]
    assert sampling["num_inference_steps"] == 2 and sampling["true_cfg_scale"] == 1.0
    assert sampling["negative_prompt"] is None
    spipe = load_pipeline(student, "cpu")
    calls = []
    spipe.transformer.register_forward_pre_hook(lambda _m, _a, k: calls.append(1), with_kwargs=True)
    images = pipeline_sampler(spipe, student).generate(["a red circle"], [0])
    assert images.shape == (1, 32, 32, 3) and len(calls) == 2  # one pass per step, two steps
    # a guidance-embedded student of this base would sample as neither guides: refused before anything is cached
    from slimdit.pipelines.loading import save_student

    save_student(guided_student(pipe.transformer), tmp_path / "embedded", base=str(out))
    cfg.update(student=str(tmp_path / "embedded"), out=str(tmp_path / "run2"))
    with pytest.raises(ValueError, match="takes a guidance input and teacher .* takes no guidance input"):
        fewstep.run_steps(cfg, progress=False)
    assert not (tmp_path / "run2" / "cache").exists()
