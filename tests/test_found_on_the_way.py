"""Gaps found on the way, each held by a test that failed before its fix: GRASP from a plan file, the
``slimdit.compress(...)`` / ``slimdit.distill(...)`` callables, a schedule stage that resumes from its saved
selection, the shapes checkpoints skipping half-written ``.tmp`` folders, and plans checked before a teacher loads."""

from __future__ import annotations

import pytest
import torch

from slimdit.compress.plan import Plan
from tests.test_resume import Killed, kill_at
from tests.test_schedules import _cfg


def test_a_plan_asks_for_grasp_and_the_student_keeps_the_values_grasp_chose(tiny_teacher, tmp_path):
    from slimdit.compress.grasp import grasp_from_data
    from slimdit.compress.plan import apply_plan
    from slimdit.compress.student import compress_to_dir, grasp_calibration
    from slimdit.models import adapter_for
    from slimdit.models.storage import load_model
    from slimdit.pipelines.loading import load_pipeline

    spec = {"units": {"block.2": {"svd": {"self_attn": {"rank": 2}}}},
            "grasp": {"images": 4, "batch_size": 2, "data": "shapes-train:4"}}
    compress_to_dir(tiny_teacher, spec, tmp_path / "student")
    plan = Plan.from_dict(spec)
    assert plan.to_dict() == spec  # the plan (and so plan.json and a run's identity) records GRASP
    pipe = load_pipeline(tiny_teacher, "cpu")
    adapter = adapter_for(pipe.transformer, pipe.scheduler.config)
    keep = grasp_from_data(adapter, pipe.transformer, plan, grasp_calibration(pipe, tiny_teacher, "shapes-train:4"))
    assert any(k.tolist() != [0, 1] for k in keep.values())  # not the two largest: plain SVD would differ
    apply_plan(adapter, pipe.transformer, plan, keep=keep)
    student = load_model(tmp_path / "student" / "transformer")
    expected = pipe.transformer.state_dict()
    for name, value in student.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


@pytest.mark.parametrize("spec, message", [
    ({"units": {"block.1": {"svd": 0.5}}, "grasp": {"imgs": 3}}, r"plan grasp: unknown field\(s\) \['imgs'\]"),
    ({"units": {"block.1": {"svd": 0.5}}, "grasp": {"images": 0}}, "plan grasp.images"),
    ({"units": {"block.1": "remove"}, "grasp": True}, "no svd op"),
    ({"units": {"block.1": "remove"}, "gasp": True}, r"plan: unknown field\(s\) \['gasp'\]"),
])
def test_a_bad_grasp_spelling_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(spec)


def test_slimdit_compress_and_distill_are_callables(tiny_teacher, tmp_path):
    import slimdit
    from slimdit.compress.student import compress_to_dir

    record = slimdit.compress(tiny_teacher, {"units": {"block.1": "remove"}}, tmp_path / "student")
    assert record.block_params_after < record.block_params_before
    assert (tmp_path / "student" / "slimdit_base.json").exists() and (tmp_path / "student" / "README.md").exists()
    assert slimdit.compress.compress is compress_to_dir  # the subpackage's names stay where they were
    with pytest.raises(ValueError, match="block.99"):
        slimdit.distill({"teacher": tiny_teacher, "out": str(tmp_path / "run"),
                         "plan": {"units": {"block.99": "remove"}}, "data": {"real": "shapes-train:8"}})


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading a teacher (or reading a data set) an error: what must not happen before a plan is checked."""
    import slimdit.compress.student as student
    import slimdit.distill.run as distill_run

    def loaded(*args, **kwargs):
        raise AssertionError("the teacher (or data) was loaded before the plan was checked")

    for module, name in ((student, "load_pipeline"), (distill_run, "load_pipeline"), (distill_run, "load_dataset")):
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("units, message", [
    ({"block.99": "remove"}, "unit 'block.99' does not exist: the model has 4 block units"),
    ({"block.1": {"svd": {"mlpp": 0.5}}}, r"plan units.block.1: unknown part\(s\) \['mlpp'\]; allowed: self_attn"),
    ({"blok.1": "remove"}, "bad unit name 'blok.1'"),
])
def test_a_bad_plan_fails_before_the_teacher_loads(tiny_teacher, tmp_path, no_loading, units, message):
    from slimdit.compress.student import compress_to_dir
    from slimdit.distill.run import run_distill

    with pytest.raises(ValueError, match=message):
        compress_to_dir(tiny_teacher, {"units": units}, tmp_path / "student")
    with pytest.raises(ValueError, match=message):
        run_distill({"teacher": tiny_teacher, "out": str(tmp_path / "run"), "plan": {"units": units},
                     "data": {"real": "shapes-train:8"}}, progress=False)
    assert not (tmp_path / "student").exists() and not (tmp_path / "run").exists()  # nothing written either


def test_an_interrupted_schedule_stage_resumes_from_its_saved_selection(tiny_teacher, tmp_path, monkeypatch):
    import slimdit.schedules.run as schedules

    cfg = _cfg(tiny_teacher, tmp_path / "run", kind="one_shot", op="remove", target=0.5)
    cfg["train"].update(steps=4, checkpoint_every=2)
    cfg["eval"] = {"benchmark": None}
    kill_at(monkeypatch, 3)  # stage 0 selected its units and trained 2 steps
    with pytest.raises(Killed):
        schedules.run_schedule(cfg, progress=False)
    monkeypatch.undo()
    selected = (tmp_path / "run" / "stages" / "00" / "selection.json").read_text()
    calls = []
    select = schedules._select_one_shot
    monkeypatch.setattr(schedules, "_select_one_shot", lambda *a: calls.append(a) or select(*a))
    cfg["train"]["max_skipped_steps"] = 2  # a field a rerun may change (as a diverged stage's message suggests)
    run = schedules.run_schedule(cfg, progress=False)
    assert calls == []  # the stage trained on from its checkpoint with the units it had selected
    assert (run / "stages" / "00" / "selection.json").read_text() == selected
    card = (run / "student" / "README.md").read_text()
    assert "schedule: `one_shot` (remove)" in card and "| block." in card


def test_shapes_checkpoints_skip_a_half_written_tmp_folder(tmp_path):
    from slimdit.worlds.shapes.checkpoints import checkpoints, resume, save_checkpoint

    def model_and_optimizer():
        torch.manual_seed(0)
        m = torch.nn.Linear(2, 2)
        return m, torch.optim.AdamW(m.parameters())

    m, opt = model_and_optimizer()
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 2, {"m": m}, {}, opt, 1.5, keep=2)
    half = tmp_path / "step_0000004.tmp"  # a kill while step 4 was being written
    half.mkdir()
    (half / "state.json").write_text("{")
    assert checkpoints(tmp_path) == [tmp_path / "step_0000002"]
    m2, opt2 = model_and_optimizer()
    assert resume(tmp_path, {"m": m2}, {}, opt2, torch.device("cpu")) == (2, 1.5)
    assert torch.equal(m2.weight, m.weight)


@pytest.mark.parametrize("command", [["analyze", "--out", "x"], ["search", "--method", "masks", "--out", "x"],
                                     ["compress", "--plan", "p.yaml", "--out", "x"]])
def test_a_renderer_is_refused_where_a_transformer_is_needed(command, tmp_path, monkeypatch, capsys):
    from slimdit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("units: {block.0: remove}\n")
    assert main([command[0], "--model", "shapes-oracle", *command[1:]]) == 2
    assert "'shapes-oracle' is a renderer without a transformer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shared_untrained_metrics_are_keyed_by_the_untrained_weights_not_their_config(tmp_path):
    """``eval.shared`` reuses an untrained student's metrics across sweep points only where its weights are the
    same: one plan gives other weights under GRASP calibrated on other data or another student precision, while
    the saved config differs by where it was loaded from."""
    from slimdit.distill.run import _weights_digest
    from slimdit.io import save_tensors

    for name, value, origin in (("a", 1.0, "x"), ("b", 1.0, "y"), ("c", 2.0, "x")):
        (tmp_path / name).mkdir()
        save_tensors(tmp_path / name / "diffusion_pytorch_model.safetensors", {"w": torch.full((4,), value)})
        (tmp_path / name / "config.json").write_text(f'{{"_name_or_path": "{origin}"}}')
    assert _weights_digest(tmp_path / "a") == _weights_digest(tmp_path / "b")  # same weights, other config
    assert _weights_digest(tmp_path / "a") != _weights_digest(tmp_path / "c")  # other weights


def test_a_selection_saved_before_free_fields_were_left_out_is_still_read(tiny_teacher, tmp_path):
    """A stage's selection digest leaves out the fields a rerun may change; a selection saved under the earlier
    digest (the whole config) is still accepted, so runs stopped before the change continue without selecting again."""
    import hashlib
    import json

    import slimdit.schedules.run as schedules
    from slimdit.config import RunConfig, load_config
    from slimdit.identity import input_fingerprints

    cfg = load_config(_cfg(tiny_teacher, tmp_path / "run", kind="one_shot", op="remove", target=0.5), RunConfig)
    inputs = input_fingerprints(cfg)
    before = json.dumps({"config": cfg.model_dump(mode="json"), "inputs": inputs}, sort_keys=True, default=str)
    legacy = hashlib.sha256(before.encode()).hexdigest()[:16]
    assert schedules._made_by(cfg, inputs, free=True) == legacy != schedules._made_by(cfg, inputs)
    plan = Plan.from_dict({"units": {"block.1": "remove"}})
    (tmp_path / "selection.json").write_text(json.dumps({"plan": plan.to_dict(), "made_by": legacy}))
    assert schedules._saved_selection(tmp_path, (schedules._made_by(cfg, inputs), legacy)).to_dict() == plan.to_dict()
    assert schedules._saved_selection(tmp_path, schedules._made_by(cfg, inputs)) is None  # another config's


def test_a_pipeline_saved_again_from_another_place_is_the_same_files(tiny_teacher, tmp_path):
    """``save_pipeline_with`` (a full export, a trained teacher) leaves out where each part was last loaded from
    (diffusers' ``_name_or_path``), so the same pipeline read from two places saves as the same files, and a run
    that fingerprinted the first copy still matches the second."""
    import shutil
    from pathlib import Path

    from slimdit.pipelines.loading import load_pipeline, save_pipeline_with

    shutil.copytree(tiny_teacher, tmp_path / "elsewhere")
    saved = []
    for k, src in enumerate((tiny_teacher, tmp_path / "elsewhere")):
        pipe = load_pipeline(str(src))
        out = save_pipeline_with(pipe, pipe.transformer, tmp_path / f"out{k}", source=str(src))
        saved.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.json"))})
    assert saved[0].keys() == saved[1].keys() and Path("model_index.json") in saved[0]
    assert saved[0] == saved[1]
    assert not any(b"_name_or_path" in b for b in saved[0].values())
