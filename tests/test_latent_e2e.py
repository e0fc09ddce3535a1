"""The real path end to end on a tiny latent PixArtSigmaPipeline: compress -> synth -> distill -> eval,
through the same commands a PixArt-Sigma user runs. Nothing here is shapes-specific but the prompts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from slimdit.cli import main


@pytest.fixture(scope="module")
def tiny_latent_pipeline(tmp_path_factory):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from slimdit.worlds.shapes.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    te = build_text_encoder(len(tok), d_model=16, num_layers=1, num_heads=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=4, cross_attention_dim=16, sample_size=16, patch_size=2,
                                  caption_channels=16, use_additional_conditions=False)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())
    d = tmp_path_factory.mktemp("pixart") / "tiny-pixart-sigma"
    pipe.save_pretrained(d)
    return d


@pytest.mark.slow  # compress, synth, distill and eval in a row
def test_compress_synth_distill_eval(tiny_latent_pipeline, tmp_path, capsys):
    model = str(tiny_latent_pipeline)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"units": {"block.1": "remove", "block.2": {"svd": {"mlp": 0.5}}}}))

    assert main(["compress", "--model", model, "--plan", str(plan), "--dry-run"]) == 0
    assert "block.1" in capsys.readouterr().out and not (tmp_path / "student").exists()
    assert main(["compress", "--model", model, "--plan", str(plan), "--out", str(tmp_path / "student")]) == 0
    assert main(["export", "--model", str(tmp_path / "student"), "--merge", "--full", "--out",
                 str(tmp_path / "dense")]) == 0

    from diffusers import PixArtSigmaPipeline

    dense = PixArtSigmaPipeline.from_pretrained(tmp_path / "dense")  # plain diffusers
    assert dense.transformer.config.num_layers == 3

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo squares\na big triangle\na blue square and a green circle\n")
    assert main(["synth", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "synth"),
                 "--steps", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "synth" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[1]["text"] == "two squares"

    cfg = {"teacher": model, "plan": str(plan), "out": str(tmp_path / "run"), "protocol": "three_stage",
           "data": {"real": str(tmp_path / "synth"), "synth": str(tmp_path / "synth"), "max_sequence_length": 16},
           "train": {"steps": 6, "batch_size": 2, "warmup_steps": 2, "lr": 1e-4, "checkpoint_every": 2,
                     "log_every": 1},
           "eval": {"limit": 6, "images_per_prompt": 1, "steps": 2}}
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "distill.yaml")]) == 0
    run = tmp_path / "run"
    for f in ("config.yaml", "plan.json", "metrics.jsonl", "summary.json", "student/slimdit_base.json"):
        assert (run / f).exists(), f
    assert sorted(p.name for p in (run / "phases").iterdir()) == ["00_local", "01_global", "02_refine"]
    assert list((run / "phases" / "01_global" / "checkpoints").glob("step_*"))
    val = [json.loads(x) for x in (run / "phases" / "01_global" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_traj_mse"] > 0 for r in val if "val_traj_mse" in r] == [True]  # at the phase's end
    s = json.loads((run / "summary.json").read_text())
    assert s["block_params"]["ratio"] < 1 and "overall" in s["student_metrics"]
    assert "overall" in s["untrained_metrics"] and s["bench"]["flop_ratio"] < 1  # before training, and the speed
    assert main(["distill", "--config", str(tmp_path / "distill.yaml")]) == 0  # finished: nothing to redo

    assert main(["bench", "--model", str(tmp_path / "student"), "--vs", model, "--repeats", "1", "--batch-size",
                 "1", "--steps", "2", "--json"]) == 0
    ratios = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(ratios) == {"latency_ratio", "param_ratio", "flop_ratio"}
    assert ratios["param_ratio"] < 1 and ratios["flop_ratio"] < 1 and ratios["latency_ratio"] > 0

    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(run / "student"), "--limit", "6", "--images-per-prompt", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    assert {"overall", "fid", "cmmd"} <= set(json.loads(out.read_text()))


def test_config_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher": "x/y", "plan": {"units": {}}, "out": str(tmp_path / "r"),
                                   "train": {"lr": -1, "optimizer": "sgd"}, "protocol": "four_stage"}))
    assert main(["distill", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.optimizer" in err and "protocol" in err


def test_example_config_resolves_with_overrides(capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "distill-shapes.yaml"
    assert main(["distill", "--config", str(cfg), "--set", "train.kd=hybrid", "--set", "train.steps=7",
                 "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["kd"] == "hybrid" and resolved["train"]["steps"] == 7
    assert main(["distill", "--config", str(cfg), "--set", "train.kd=best", "--dry-run"]) == 2
    assert "train.kd" in capsys.readouterr().err


@pytest.mark.slow  # a distill per sweep point
def test_sweep_runs_every_point_and_tabulates(tiny_latent_pipeline, tmp_path, capsys):
    model = str(tiny_latent_pipeline)
    base = {"teacher": model, "plan": {"units": {"block.1": "remove"}}, "out": "ignored",
            "protocol": "real_only", "data": {"real": "shapes-train:4", "max_sequence_length": 16},
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "checkpoint_every": 2},
            "eval": {"limit": 6, "images_per_prompt": 1, "steps": 2}}
    sweep = {"kind": "distill", "out": str(tmp_path / "sw"), "base": base,
             "set": {"eval.bench": False, "eval.shared": str(tmp_path / "sw" / "shared")},
             "grid": {"train.kd": ["output", "normalized_hybrid"]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 0
    rows = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["grid"]["train.kd"] for r in rows] == ["output", "normalized_hybrid"]
    # same plan, same compression: the untrained students are identical; training differs by the loss only
    assert rows[0]["untrained_metrics"] == rows[1]["untrained_metrics"]
    # ... so they, and the teacher, were evaluated once and shared
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "sw" / "shared").iterdir()) == ["teacher", "untrained"]
    assert "| train.kd | block_param_ratio | untrained.overall" in (tmp_path / "sw" / "results.md").read_text()
    assert (tmp_path / "sw" / "results.png").stat().st_size > 0
    sweep["grid"]["train.kd"].append("best")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "bad.yaml")]) == 2
    assert "sweep point best" in capsys.readouterr().err and not (tmp_path / "sw" / "best").exists()


def test_trajectory_mse_is_zero_for_the_teacher_and_grows_with_compression(tiny_latent_pipeline):
    import copy

    from slimdit.compress.plan import Plan, apply_plan
    from slimdit.distill.fidelity import record_trajectories, trajectory_mse
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler

    model = str(tiny_latent_pipeline)
    pipe = load_pipeline(model, "cpu")
    sampler = pipeline_sampler(pipe, model, steps=3)
    traj = record_trajectories(sampler, ["a red circle", "two blue squares"], seed=1)
    assert len(traj.calls) == 3  # one (CFG-batched) call per sampling step
    teacher = pipe.transformer
    assert trajectory_mse(teacher, traj) == {"all": 0.0, "high_noise": 0.0, "low_noise": 0.0}
    adapter = adapter_for(teacher)
    full_rank = copy.deepcopy(teacher)
    parts = {p: {"rank": 16} for p in ("self_attn", "cross_attn", "mlp")}  # hidden size 16: full rank
    apply_plan(adapter, full_rank, Plan.from_dict({"units": {"block.1": {"svd": parts}}}))
    removed = copy.deepcopy(teacher)
    apply_plan(adapter, removed, Plan.from_dict({"units": {"block.1": "remove"}}))
    assert trajectory_mse(full_rank, traj)["all"] < 1e-10 < trajectory_mse(removed, traj)["all"]


def test_new_teacher_weights_under_the_same_name_invalidate_its_synthetic_set(tiny_latent_pipeline, tmp_path):
    import shutil

    from slimdit.config import DataConfig
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.run import Conditionings
    from slimdit.pipelines.loading import load_pipeline, model_fingerprint

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_latent_pipeline, teacher)
    before = model_fingerprint(str(teacher))
    assert before == model_fingerprint(str(tiny_latent_pipeline))  # the files, not where they lie
    real = load_dataset("shapes-train:2")
    cfg = DataConfig(real="shapes-train:2", synth=str(tmp_path / "synth"), synth_images=2, max_sequence_length=16)
    Conditionings(cfg, real, load_pipeline(str(teacher), "cpu"), str(teacher), tmp_path, None, 0)._synth(
        tmp_path / "synth")
    assert len((tmp_path / "synth" / "metadata.jsonl").read_text().splitlines()) == 2

    w = next((teacher / "transformer").glob("*.safetensors"))  # retrained in place: same name, new weights
    from safetensors.torch import load_file, save_file

    t = load_file(w)
    t = {k: v + 1e-3 for k, v in t.items()}
    save_file(t, w)
    assert model_fingerprint(str(teacher)) != before
    with pytest.raises(ValueError, match="weights: '[0-9a-f]+' -> '[0-9a-f]+'.*model's files changed"):
        Conditionings(cfg, real, load_pipeline(str(teacher), "cpu"), str(teacher), tmp_path, None, 0)._synth(
            tmp_path / "synth")
