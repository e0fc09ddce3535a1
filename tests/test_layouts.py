"""Real layouts: a transformer-only directory or hub repo over a base pipeline, an offline Hub cache, and errors
that name a missing component."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from slimdit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def transformer_only(tiny_teacher, tmp_path_factory):
    """The tiny teacher's transformer, perturbed so it differs from the base's, alone in a hub-style directory
    (``transformer/config.json`` and weights, no ``model_index.json``)."""
    from diffusers import PixArtTransformer2DModel

    tr = PixArtTransformer2DModel.from_pretrained(Path(tiny_teacher) / "transformer")
    with torch.no_grad():
        tr.proj_out.bias.add_(0.5)
    d = tmp_path_factory.mktemp("tr") / "transformer-only"
    tr.save_pretrained(d / "transformer")
    return d, tr


def test_a_transformer_only_directory_over_a_base_pipeline_loads_generates_and_distils(
        tiny_teacher, transformer_only, tmp_path):
    from slimdit.pipelines.loading import join_model, load_pipeline, load_sampler, model_fingerprint

    d, tr = transformer_only
    model = join_model(tiny_teacher, str(d))
    pipe = load_pipeline(model, "cpu")
    assert torch.equal(pipe.transformer.proj_out.bias, tr.proj_out.bias)  # the transformer is the given one
    assert model_fingerprint(model) != model_fingerprint(tiny_teacher)
    images = load_sampler(model).generate(["a red circle"], [0])
    base = load_sampler(tiny_teacher).generate(["a red circle"], [0])
    assert images.shape == base.shape and not (images == base).all()

    with pytest.raises(FileNotFoundError, match="holds only a transformer"):  # given as the pipeline
        load_pipeline(str(d), "cpu")
    assert main(["generate", "--model", tiny_teacher, "--transformer", str(d), "--prompt", "a red circle",
                 "--num-images", "1", "--out", str(tmp_path / "g"), "--steps", "2"]) == 0

    cfg = {"teacher": {"pipeline": tiny_teacher, "transformer": str(d)}, "out": str(tmp_path / "run"),
           "plan": {"units": {"block.1": "remove"}}, "protocol": "real_only", "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "checkpoint_every": 1},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["teacher"] == model  # one string names the teacher in the run's identity
    student = load_pipeline(str(tmp_path / "run" / "student"), "cpu").transformer
    assert len(student.transformer_blocks) == len(tr.transformer_blocks) - 1
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.distill.reward import RewardConfig

    for config in (StepsConfig, RewardConfig):  # the few-step and reward configs read the same form
        assert config(teacher=cfg["teacher"], out="x").teacher == model
    assert StepsConfig(student=cfg["teacher"], out="x").student == model  # and a step run's starting model


def test_a_pipeline_directory_missing_a_component_is_named(tiny_teacher, tmp_path):
    from slimdit.pipelines.loading import load_pipeline

    broken = shutil.copytree(tiny_teacher, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="lacks component\\(s\\) vae"):
        load_pipeline(str(broken), "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pipeline(f"{tiny_teacher}#transformer={tmp_path}", "cpu")
    assert main(["generate", "--transformer", str(tmp_path), "--model", str(broken), "--prompt", "x",
                 "--out", str(tmp_path / "g")]) == 2


def _hub_cache(cache: Path, repo: str, src: Path) -> None:
    """Lay ``src`` out as the snapshot of hub repo ``repo`` in a Hugging Face cache, as a download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(src, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_hub_ids_load_from_a_local_cache_offline(tiny_teacher, transformer_only, tmp_path):
    d, _ = transformer_only
    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/tiny-pipeline", Path(tiny_teacher))
    _hub_cache(cache, "someone/tiny-transformer", d)
    script = (
        "import torch\n"
        "from slimdit.pipelines.loading import load_pipeline, sampling_defaults\n"
        "p = load_pipeline('someone/tiny-pipeline#transformer=someone/tiny-transformer', 'cpu')\n"
        "print(round(float(p.transformer.proj_out.bias.mean() - load_pipeline('someone/tiny-pipeline', 'cpu')"
        ".transformer.proj_out.bias.mean()), 3))\n"
        "print(sampling_defaults('someone/tiny-pipeline')['num_inference_steps'])\n"
        "for m in ('someone/not-cached', 'someone/tiny-transformer'):\n"
        "    try:\n        load_pipeline(m, 'cpu')\n    except FileNotFoundError as e:\n        print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "0.5"  # the transformer came from the transformer-only repo
    assert lines[1] == str(json.loads((Path(tiny_teacher) / "slimdit.json").read_text())["sampling"]
                           ["num_inference_steps"])
    assert lines[2].startswith("ERR could not load model 'someone/not-cached'")
    assert "holds only a transformer" in lines[3] and "--transformer someone/tiny-transformer" in lines[3]


def test_a_student_is_its_transformer_and_the_name_of_its_base(tiny_teacher, tmp_path):
    import re

    from diffusers import DiffusionPipeline

    from slimdit.compress.student import compress_to_dir, export_student
    from slimdit.pipelines.loading import load_pipeline, model_fingerprint

    student = tmp_path / "student"
    compress_to_dir(tiny_teacher, {"units": {"block.1": "remove"}}, student)
    assert sorted(p.name for p in student.iterdir()) == ["README.md", "plan.json", "slimdit.json",
                                                        "slimdit_base.json", "transformer"]
    base = json.loads((student / "slimdit_base.json").read_text())
    assert base["base"] == str(Path(tiny_teacher).resolve())  # a local base by its absolute path

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", use_resolution_binning=False).images  # 32 px is no PixArt bin

    pipe = load_pipeline(str(student), "cpu")
    assert len(pipe.transformer.transformer_blocks) == 3 and pipe.text_encoder is not None
    assert model_fingerprint(str(student)) != model_fingerprint(tiny_teacher)

    # the card's plain-diffusers code runs as written
    card = (student / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/student", str(student))
    scope: dict = {}
    exec(code.replace("<your prompt>", "a red circle"), scope)  # at the teacher's recorded sampling settings
    assert scope["image"].size == sample(pipe)[0].shape[:2]

    # a standalone export is a whole pipeline that diffusers loads, sampling what the student samples
    full = export_student(str(student), tmp_path / "full", full=True)
    assert (full / "model_index.json").exists() and (full / "text_encoder").is_dir()
    assert (sample(DiffusionPipeline.from_pretrained(full)) == sample(pipe)).all()

    # a base changed since the student was saved loads with a warning
    changed = tmp_path / "changed"
    shutil.copytree(student, changed)
    record = json.loads((changed / "slimdit_base.json").read_text())
    (changed / "slimdit_base.json").write_text(json.dumps({**record, "base_fingerprint": "0" * 16}))
    with pytest.warns(UserWarning, match="has changed since the student was saved"):
        load_pipeline(str(changed), "cpu")

    # a base that moved is named, with the file that names it
    moved = tmp_path / "moved"
    shutil.copytree(student, moved)
    (moved / "slimdit_base.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="runs in the base pipeline .*gone.* slimdit_base.json"):
        load_pipeline(str(moved), "cpu")

    # a student saved where a whole pipeline was reads as the student afterwards
    with pytest.raises(ValueError, match="its own base"):
        compress_to_dir(str(full), {"units": {"block.0": "remove"}}, full)
    compress_to_dir(tiny_teacher, {"units": {"block.0": "remove", "block.1": "remove"}}, full)
    assert not (full / "model_index.json").exists() and not (full / "text_encoder").exists()
    assert len(load_pipeline(str(full), "cpu").transformer.transformer_blocks) == 2
