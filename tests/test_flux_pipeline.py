"""FluxPipeline in and out, on a tiny real one (1 double + 1 single block, tiny CLIP and T5, AutoencoderKL,
flow-matching Euler): load, sample, compress to a plain-diffusers student, distill, evaluate and bench through the
same commands a Flux-dev user runs."""

from __future__ import annotations

import json

import yaml

from slimdit.cli import main


def test_loads_samples_and_packs_64_tokens(tiny_flux_pipeline, tmp_path):
    from slimdit.pipelines.loading import load_pipeline, load_sampler, pipeline_sampler

    pipe = load_pipeline(str(tiny_flux_pipeline), "cpu")
    assert type(pipe).__name__ == "FluxPipeline"
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, a, k: calls.append(k["hidden_states"].shape),
                                                        with_kwargs=True)
    images = pipeline_sampler(pipe, str(tiny_flux_pipeline)).generate(["a red circle", "two squares"], [0, 1])
    handle.remove()
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    assert calls[0][1] == 64  # 16x16 latents, 2x2-packed: one guidance-embedded pass per step, no CFG batch
    again = load_sampler(str(tiny_flux_pipeline)).generate(["two squares"], [1])
    assert (again[0] == images[1]).all()  # per-image seeds


def test_compress_to_a_student_plain_diffusers_loads_and_samples(tiny_flux_pipeline, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"units": {"single.1": "remove"}}))
    assert main(["compress", "--model", str(tiny_flux_pipeline), "--plan", str(plan), "--out",
                 str(tmp_path / "student")]) == 0
    # plain diffusers: the student's transformer over its base pipeline, as its card says
    transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "student", subfolder="transformer")
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline, transformer=transformer)
    assert pipe.transformer.config.num_single_layers == 1
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
               output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_distill_eval_and_bench_on_flux(tiny_flux_pipeline, tmp_path):
    cfg = {"teacher": str(tiny_flux_pipeline), "out": str(tmp_path / "run"),
           "plan": {"units": {"single.0": "remove", "double.0": {"svd": {"img_mlp": 0.5, "txt_attn": 0.5}}}},
           "protocol": "two_stage", "data": {"real": "shapes-train:8", "synth_images": 4},
           "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "checkpoint_every": 2,
                     "log_every": 1, "val_prompts": 2},
           "eval": {"limit": 6, "images_per_prompt": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["block_params"]["ratio"] < 1 and "overall" in s["student_metrics"] and s["bench"]["flop_ratio"] < 1
    cache = next((run / "cache").rglob("shard_00000.safetensors"))
    from slimdit.io import load_tensors

    keys = set(load_tensors(cache))
    assert {"cond.prompt_embeds", "cond.pooled_prompt_embeds", "latents"} <= keys
    assert {"prompt_embeds", "pooled_prompt_embeds"} <= set(load_tensors(cache.parent / "null.safetensors"))
    assert json.loads((run / "synth" / "synth.json").read_text())["images"] == 4  # teacher images for refine
    rows = [json.loads(x) for x in (run / "phases" / "00_global" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["total"] > 0 for r in rows if "total" in r) and any("val_traj_mse" in r for r in rows)
    assert main(["eval", "--model", str(run / "student"), "--limit", "6", "--images-per-prompt", "1", "--out",
                 str(tmp_path / "m.json")]) == 0
    assert "overall" in json.loads((tmp_path / "m.json").read_text())


def test_analyze_search_and_a_schedule_on_flux(tiny_flux_pipeline, tmp_path):
    model = str(tiny_flux_pipeline)
    assert main(["analyze", "--model", model, "--criteria", "magnitude,cka,io_mse,metric", "--prompts",
                 "shapes-train:4:7",
                 "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert s["units"] == ["double.0", "single.0", "single.1"] and set(s["metric"]) == set(s["units"])
    assert len(s["cka"]["text"]["heatmap"]) == 3 and (tmp_path / "a" / "plots" / "cka_heatmap_text.png").exists()
    assert set(s["io_mse"]) == set(s["units"]) and all(v > 0 for v in s["io_mse"].values())
    assert "io_mse" in s["agreement"]
    assert main(["search", "--model", model, "--units", "1", "--op", "remove", "--method", "greedy", "--prompts",
                 "shapes-train:4:7", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert len(json.loads((tmp_path / "s" / "search.json").read_text())["greedy"]["units"]) == 1
    assert main(["search", "--model", model, "--units", "1", "--op", "0.5", "--method", "both", "--trials", "3",
                 "--prompts", "shapes-train:4:7", "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "search.json").read_text())["optuna"]["units"]
    assert main(["search", "--model", model, "--method", "masks", "--pattern", "1:2", "--data", "shapes-train:8",
                 "--mask-steps", "3", "--out", str(tmp_path / "m")]) == 0
    assert len(json.loads((tmp_path / "m" / "search.json").read_text())["masks"]["units"]) == 1
    cfg = {"teacher": model, "out": str(tmp_path / "run"),
           "schedule": {"kind": "one_shot", "op": "svd", "svd_ratio": 0.5, "target": 0.8},
           "calibration": {"prompts": "shapes-train:4:7", "steps": 2},
           "protocol": [{"name": "all", "trainable": ["all"], "dataset": "real", "fraction": 1.0}],
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "checkpoint_every": 1},
           "eval": {"limit": 6, "images_per_prompt": 1, "steps": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["stages"][0]["block_param_ratio"] <= 0.8 and "overall" in s["stages"][0]


def test_the_demo_and_generate_run_on_flux(tiny_flux_pipeline, tmp_path, capsys):
    from tests.test_cli import TINY_DEMO

    model = str(tiny_flux_pipeline)
    assert main(["generate", "--model", model, "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "grid.png").exists()
    # the demo's linear progressive schedule; a Flux's units differ in size, so the number per stage is auto
    sets = [x for item in [*TINY_DEMO, "schedule.units_per_stage=auto", "schedule.target=0.8"]
            for x in ("--set", item)]
    # at the packaged base ratio 0.6 the least important unit alone removes more than a stage's share: refused,
    # naming the way out
    assert main(["demo", "--model", model, "--out", str(tmp_path / "demo"), *sets]) == 2
    assert "lower schedule.base_ratio" in capsys.readouterr().err
    assert main(["demo", "--model", model, "--out", str(tmp_path / "demo"), *sets,
                 "--set", "schedule.stages=1", "--set", "schedule.target=0.6"]) == 0
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["schedule"] == "linear_progressive" and len(s["stages"]) == 1
    assert {"shapes_geneval_overall", "fid", "cmmd", "block_params", "latency_ratio", "retained_overall"} <= \
        set(s["student"])
    assert s["student"]["block_param_ratio"] <= 0.6 and (tmp_path / "demo" / "report.html").exists()


def test_a_flux_pipeline_without_slimdit_json_samples_at_flux_dev_defaults(tiny_flux_pipeline, tmp_path):
    import shutil

    from slimdit.pipelines.loading import sampling_defaults

    bare = shutil.copytree(tiny_flux_pipeline, tmp_path / "bare")
    (bare / "slimdit.json").unlink()
    assert sampling_defaults(str(bare)) == {"num_inference_steps": 50, "guidance_scale": 3.5,
                                            "max_sequence_length": 512}  # thesis table 4.4
    (bare / "slimdit.json").write_text(json.dumps({"sampling": {"num_inference_steps": 4}}))
    assert sampling_defaults(str(bare))["num_inference_steps"] == 4  # what a directory records wins
    assert sampling_defaults(str(bare))["max_sequence_length"] == 512
