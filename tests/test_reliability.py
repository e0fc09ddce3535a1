"""Nothing silently wrong: a diverged run stops and saves nothing non-finite, changed inputs are refused by name,
synthetic sets never mix, and configs find their files wherever the command runs from."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from slimdit.cli import main
from slimdit.distill.trainer import TrainConfig, Trainer
from slimdit.errors import TrainingDiverged
from slimdit.models import adapter_for
from tests.test_resume import Killed, distill_cfg, kill_at
from tests.test_schedules import _cfg
from tests.test_trainer import CFG, SCHED, _data, _student

ROOT = Path(__file__).resolve().parents[1]


def _finite(ck: Path) -> bool:
    from slimdit.io import load_tensors

    return all(torch.isfinite(t).all() for f in ck.glob("*.safetensors") for t in load_tensors(f).values())


# ---- divergence ---------------------------------------------------------------------------------------------
def test_nonfinite_step_stops_at_once_and_keeps_the_last_finite_checkpoint(tmp_path):
    teacher, student, kept = _student()
    cfg = TrainConfig(**{**CFG, "lr": 1e6, "optimizer": "adamw", "steps": 20, "warmup_steps": 1,
                         "checkpoint_every": 1, "keep_checkpoints": 2})
    t = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path, kept)
    with pytest.raises(TrainingDiverged, match=r"at step 2 .*non-finite loss nan.*step_0000001 \(step 1\), kept"):
        t.train(progress=False)
    cks = sorted((tmp_path / "checkpoints").iterdir())
    assert [c.name for c in cks] == ["step_0000001"] and _finite(cks[0])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "non-finite" in rows[-1]["error"]


def test_skipped_nonfinite_steps_are_bounded_and_logged(tmp_path):
    data = _data()
    data.latents[3] = float("nan")  # one poisoned sample: every step that draws it has a NaN loss
    teacher, student, kept = _student()
    cfg = TrainConfig(**{**CFG, "steps": 6, "ema_decay": None})
    probe = Trainer(adapter_for(student, SCHED), teacher, copy.deepcopy(student), data, cfg, tmp_path / "probe", kept)
    bad = [s + 1 for s in range(6) if not torch.isfinite(probe._batch(s, 0)[0]).all()]
    assert 1 <= len(bad) < 6

    allowed = TrainConfig(**{**CFG, "steps": 6, "ema_decay": None, "max_skipped_steps": len(bad)})
    t = Trainer(adapter_for(student, SCHED), teacher, student, data, allowed, tmp_path / "skip", kept)
    t.train(progress=False)
    assert all(torch.isfinite(p).all() for p in t.student_model().parameters())
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == bad  # never silent

    teacher, student, kept = _student()
    strict = TrainConfig(**{**CFG, "steps": 6, "ema_decay": None, "max_skipped_steps": len(bad) - 1})
    t = Trainer(adapter_for(student, SCHED), teacher, student, data, strict, tmp_path / "strict", kept)
    with pytest.raises(TrainingDiverged, match=f"at step {bad[-1]} "):
        t.train(progress=False)


def test_a_student_with_nonfinite_weights_is_never_saved(tmp_path):
    from slimdit.models.storage import save_model

    _, student, _ = _student()
    with torch.no_grad():
        next(student.parameters())[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="not finite"):
        save_model(student, tmp_path / "student")
    assert not (tmp_path / "student").exists()


def test_diverged_distill_exits_nonzero_with_no_student(tiny_teacher, tmp_path, capsys):
    cfg = distill_cfg(tiny_teacher, tmp_path / "run")
    cfg["train"].update(optimizer="adamw", checkpoint_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "c.yaml"), "--set", "train.lr=1e6"]) == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "last finite checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "student").exists() and not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run").rglob("done.json"))
    assert all(_finite(ck) for ck in (tmp_path / "run").rglob("step_*"))


# ---- run identity -------------------------------------------------------------------------------------------
def _started_distill(teacher, run, plan_file) -> dict:
    """A distill run that did some work (killed in its first phase after a checkpoint) with its plan in
    ``plan_file``."""
    from slimdit.distill.run import run_distill

    cfg = {**distill_cfg(teacher, run), "plan": str(plan_file)}
    with pytest.MonkeyPatch.context() as mp:
        kill_at(mp, 5)
        with pytest.raises(Killed):
            run_distill(cfg, progress=False)
    return cfg


def test_an_edited_plan_file_is_refused_by_name(tiny_teacher, tmp_path):
    from slimdit.distill.run import run_distill

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"units": {"block.1": "remove"}}))
    cfg = _started_distill(tiny_teacher, tmp_path / "run", plan)
    before = (tmp_path / "run" / "plan.json").read_text()
    plan.write_text(yaml.safe_dump({"units": {"block.2": "remove"}}))  # edited in place, same path
    with pytest.raises(ValueError, match=r"input plan\.units\.block\.1: 'remove' -> '<absent>'"):
        run_distill(cfg, progress=False)
    assert (tmp_path / "run" / "plan.json").read_text() == before  # nothing rewritten


def test_changed_teacher_files_or_data_are_refused_by_name(tiny_teacher, tmp_path):
    from slimdit.config import DistillConfig
    from slimdit.identity import check_run_dir, input_fingerprints

    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    (data / "a.png").write_bytes(b"png")
    cfg = DistillConfig.model_validate({"teacher": str(teacher), "plan": {"units": {}}, "out": str(tmp_path / "run"),
                                        "data": {"real": str(data)}})
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    check_run_dir(cfg.out, cfg.model_copy(update={"teacher": str(teacher) + "/"}), input_fingerprints(cfg))
    (tmp_path / "run" / "phases" / "00_local" / "checkpoints" / "step_0000001").mkdir(parents=True)  # work
    check_run_dir(cfg.out, cfg.model_copy(update={"teacher": str(teacher) + "/."}), input_fingerprints(cfg))
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))  # unchanged (however its paths are spelled): continues

    (data / "a.png").write_bytes(b"png, redrawn")
    with pytest.raises(ValueError, match="input data.real"):
        check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    (data / "a.png").write_bytes(b"png")
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace("{", '{"note": "retrained",', 1))
    with pytest.raises(ValueError, match="input teacher"):
        check_run_dir(cfg.out, cfg, input_fingerprints(cfg))


def test_a_run_saved_before_a_field_existed_continues_and_a_real_change_is_still_refused(tiny_teacher, tmp_path):
    from slimdit.config import DistillConfig
    from slimdit.identity import check_run_dir, input_fingerprints

    cfg = DistillConfig.model_validate({"teacher": tiny_teacher, "plan": {"units": {}}, "out": str(tmp_path / "run")})
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    (tmp_path / "run" / "phases" / "00_local" / "checkpoints" / "step_0000001").mkdir(parents=True)  # work
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["train"]["grad_clip"]  # as a config written before the field existed
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))  # the absent field is its default: the run continues
    with pytest.raises(ValueError, match=r"config train\.grad_clip: 0\.001 -> 0\.5"):
        check_run_dir(cfg.out, cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_clip": 0.5})}),
                      input_fingerprints(cfg))
    # a class that sets its own section defaults (a step run's train: grad_clip 1.0, not the section's 0.001)
    from slimdit.distill.fewstep import StepsConfig

    steps = StepsConfig.model_validate({"teacher": tiny_teacher, "out": str(tmp_path / "steps")})
    check_run_dir(steps.out, steps, input_fingerprints(steps))
    (tmp_path / "steps" / "rounds" / "00" / "checkpoints" / "step_0000001").mkdir(parents=True)  # work
    saved = yaml.safe_load((tmp_path / "steps" / "config.yaml").read_text())
    del saved["train"]["grad_clip"], saved["gan_weight"]
    (tmp_path / "steps" / "config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(steps.out, steps, input_fingerprints(steps))


def test_infeasible_schedule_names_its_fields_and_the_fixed_config_takes_over(tiny_teacher, tmp_path):
    from slimdit.schedules.run import run_schedule

    bad = _cfg(tiny_teacher, tmp_path / "run", kind="linear_progressive", target=0.2, stages=1, units_per_stage=2,
               base_ratio=0.3)
    bad["eval"] = {"benchmark": None}
    with pytest.raises(ValueError, match=r"eq\. 4\.21") as e:
        run_schedule(bad, progress=False)
    assert all(f in str(e.value) for f in ("schedule.units_per_stage = 2", "schedule.base_ratio = 0.3",
                                            "schedule.stages", "schedule.target = 0.2"))
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline

    tr = load_pipeline(tiny_teacher, "cpu").transformer
    p = adapter_for(tr).block_params(tr)
    n = p - 0.2 * p  # what the config asks for, not an internally adjusted figure
    assert f"remove {n:,.0f} block parameters" in str(e.value)
    fixed = copy.deepcopy(bad)
    fixed["schedule"].update(target=0.8, base_ratio=0.5)
    run_schedule(fixed, progress=False)  # the failed run held no work: no "holds a run with another config"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    with pytest.raises(ValueError, match=r"config schedule\.target: 0\.8 -> 0\.2"):
        run_schedule(bad, progress=False)  # now it holds work, so the old config is refused, by field


# ---- synth --------------------------------------------------------------------------------------------------
def test_synth_refuses_to_append_a_set_made_otherwise(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo squares\n")
    other = tmp_path / "q.txt"
    other.write_text("a blue square\nthree triangles\n")
    out = str(tmp_path / "synth")
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(prompts), "--out", out]) == 0
    rec = json.loads((tmp_path / "synth" / "synth.json").read_text())
    assert rec["model"] == "shapes-oracle" and rec["images"] == 2 and rec["seed"] == 0
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(prompts), "--out", out]) == 0  # finished
    capsys.readouterr()
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(other), "--out", out]) == 2
    assert "prompts_sha256" in capsys.readouterr().err
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(prompts), "--out", out, "--seed", "5"]) == 2
    assert "seed: 0 -> 5" in capsys.readouterr().err
    rows = (tmp_path / "synth" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 2  # nothing appended

    (tmp_path / "synth" / "synth.json").unlink()  # a folder of unknown origin
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(prompts), "--out", out]) == 2
    assert "did not record" in capsys.readouterr().err


def test_synth_refuses_another_model(tiny_teacher, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = str(tmp_path / "synth")
    assert main(["synth", "--model", "shapes-oracle", "--prompts", str(prompts), "--out", out]) == 0
    assert main(["synth", "--model", tiny_teacher, "--prompts", str(prompts), "--out", out, "--steps", "2"]) == 2
    assert "model: 'shapes-oracle' -> " in capsys.readouterr().err


# ---- config paths -------------------------------------------------------------------------------------------
def test_config_input_paths_are_read_relative_to_the_config_file(tmp_path, monkeypatch):
    from slimdit.config import load_config
    from slimdit.experiments.sweep import load_sweep

    monkeypatch.chdir(tmp_path)  # not the repository root
    cfg = load_config(ROOT / "configs" / "distill-shapes.yaml")
    assert Path(cfg.plan).exists() and Path(cfg.plan).name == "shapes-remove-middle4.yaml"
    for sweep in ("removal-vs-svd", "oneshot-vs-progressive"):
        _, points = load_sweep(ROOT / "configs" / "sweeps" / f"{sweep}.yaml")
        assert all(not isinstance(c.plan, str) or Path(c.plan).exists() for _, c in points if hasattr(c, "plan"))
    (tmp_path / "sub" / "plans").mkdir(parents=True)
    (tmp_path / "sub" / "plans" / "p.yaml").write_text("units: {block.1: remove}\n")
    (tmp_path / "sub" / "c.yaml").write_text("teacher: shapes-pixart\nplan: plans/p.yaml\nout: runs/x\n")
    assert load_config("sub/c.yaml").plan == str(tmp_path / "sub" / "plans" / "p.yaml")  # absolute
    # on the command line a path is the working directory's, as everywhere
    assert load_config("sub/c.yaml", overrides={"plan": "sub/plans/p.yaml"}).plan == "sub/plans/p.yaml"


def test_an_unwritable_run_directory_fails_in_one_line_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    import slimdit.distill.run as distill_run

    def never(*a, **k):
        raise AssertionError("the teacher was loaded before the output was checked")

    monkeypatch.setattr(distill_run, "load_pipeline", never)
    (tmp_path / "file").write_text("not a folder")
    cfg = {"teacher": "shapes-pixart", "plan": {"units": {"block.1": "remove"}}, "out": str(tmp_path / "file" / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write out: {tmp_path / 'file' / 'run'}" in err and "Not a directory" in err


def test_a_reward_runs_baseline_is_checked_by_its_files_and_a_record_from_before_continues(tiny_teacher, tmp_path):
    from slimdit.distill.reward import RewardConfig
    from slimdit.identity import check_run_dir, input_fingerprints

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_teacher, base)
    cfg = RewardConfig(teacher=tiny_teacher, out=str(run), baseline=str(base), data={"real": "shapes-train:8"})
    check_run_dir(run, cfg, input_fingerprints(cfg))
    (run / "summary.json").write_text("{}")  # work done: its metrics/baseline.json is kept by a rerun
    # a record written before the baseline was recorded is taken as matching it, and gains it
    record = json.loads((run / "inputs.json").read_text())
    fingerprint = record.pop("baseline")
    (run / "inputs.json").write_text(json.dumps(record))
    check_run_dir(run, cfg, input_fingerprints(cfg))
    assert json.loads((run / "inputs.json").read_text())["baseline"] == fingerprint
    # the baseline retrained in place, under the same path: refused by name, the record left as it was
    with (base / "model_index.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=f"input baseline: '{fingerprint}' -> '"):
        check_run_dir(run, cfg, input_fingerprints(cfg))
    assert json.loads((run / "inputs.json").read_text())["baseline"] == fingerprint


def test_the_demos_analysis_is_made_by_its_prompt_files_contents(tmp_path):
    from slimdit.demo import AnalysisSection, analysis_made_by

    spec = AnalysisSection()  # a registered spec is its own identity: nothing added, earlier records still match
    assert "prompts_files" not in analysis_made_by(spec, "t", "remove")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    section = AnalysisSection(prompts=str(prompts))
    first = analysis_made_by(section, "t", "remove")
    prompts.write_text("a blue square\n")  # the same path, other prompts: the analysis is made again
    assert analysis_made_by(section, "t", "remove") != first


def test_a_redone_demo_analysis_replaces_its_time_and_a_kept_one_keeps_it(tmp_path, monkeypatch):
    import time

    import slimdit.importance.analyze
    import slimdit.schedules.run
    from slimdit.demo import run_demo

    def analyze(*args, **kwargs):  # stands in for the analysis: takes a known time
        time.sleep(0.3)

    def schedule(*args, **kwargs):  # the schedule fails: the run holds no work and may be taken over
        raise RuntimeError("stopped after the analysis")

    monkeypatch.setattr(slimdit.importance.analyze, "analyze", analyze)
    monkeypatch.setattr(slimdit.schedules.run, "run_schedule", schedule)
    out = tmp_path / "demo"
    timings = out / "timings.json"
    for overrides in ({}, {}, {"analysis.steps": 5}):  # made, kept by a rerun, redone under other settings
        with pytest.raises(RuntimeError, match="stopped after the analysis"):
            run_demo(out, overrides, progress=False)
        assert 0.3 <= json.loads(timings.read_text())["analysis"] < 0.6  # once, never two attempts' sum


def test_a_hub_ids_fingerprint_names_its_cached_revision_and_records_from_before_continue(tiny_teacher, tmp_path,
                                                                                        monkeypatch):
    import huggingface_hub.constants

    from slimdit.config import DistillConfig
    from slimdit.distill.reflow import check_pairs_record
    from slimdit.identity import check_run_dir, input_fingerprints, same_value, without_revisions
    from slimdit.pipelines.loading import model_fingerprint
    from tests.test_layouts import _hub_cache

    cache = tmp_path / "snapshots" / "hub"  # a folder named like the cache's own on the way: not taken for a commit
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo, first, second = "someone/tiny-pipeline", "0" * 40, "1" * 40
    _hub_cache(cache, repo, Path(tiny_teacher))
    transformer = tmp_path / "transformer-only" / "transformer"  # a transformer-only repo: transformer/config.json
    transformer.mkdir(parents=True)
    shutil.copy(Path(tiny_teacher) / "transformer" / "config.json", transformer)
    _hub_cache(cache, "someone/tiny-transformer", transformer.parent)
    assert model_fingerprint(repo) == f"{repo}@{first}"
    assert model_fingerprint(f"{repo}#transformer=someone/tiny-transformer") == \
        f"{repo}@{first}+someone/tiny-transformer@{first}"
    assert model_fingerprint(f"{repo}#transformer=someone/not-cached") == f"{repo}@{first}+someone/not-cached"

    # the legacy rule: a bare hub id matches its cached revision, part by part; nothing else does
    assert same_value(repo, f"{repo}@{first}") and not same_value(f"{repo}@{first}", f"{repo}@{second}")
    assert same_value("a/b+c/d", f"a/b@{first}+c/d@{second}")  # recorded before revisions were
    assert same_value(f"a/b@{first}+c/d", f"a/b@{first}+c/d@{second}")  # the transformer downloaded since
    assert not same_value(f"{repo}@{first}", repo)  # the recorded revision is no longer cached: a change
    assert not same_value("someone/other", f"{repo}@{first}") and not same_value("0a1b", f"0a1b@{first}")
    assert not same_value("a/b+c/d", f"a/b@{first}")
    assert without_revisions({"teacher": f"a/b@{first}+c/d", "x": [f"e/f@{second}", 3]}) == \
        {"teacher": "a/b+c/d", "x": ["e/f", 3]}

    cfg = DistillConfig.model_validate({"teacher": repo, "plan": {"units": {}}, "out": str(tmp_path / "run"),
                                        "data": {"real": "shapes-train:8"}})
    run, pairs = Path(cfg.out), tmp_path / "pairs"
    check_run_dir(run, cfg, input_fingerprints(cfg))
    (run / "summary.json").write_text("{}")  # work done
    record = {"made_by": {"teacher": repo}, "rows": 8}  # as runs recorded a hub id before its revision
    check_pairs_record(pairs, record)
    (pairs / "pairs_00000.safetensors").write_bytes(b"")
    (run / "inputs.json").write_text(json.dumps({**input_fingerprints(cfg), "teacher": repo}))
    now = {"made_by": {"teacher": model_fingerprint(repo)}, "rows": 8}
    check_run_dir(run, cfg, input_fingerprints(cfg))  # the bare id matches the cached revision: both continue
    check_pairs_record(pairs, now)
    assert json.loads((run / "inputs.json").read_text())["teacher"] == f"{repo}@{first}"  # and gain it
    assert json.loads((pairs / "pairs.json").read_text()) == now

    # a new revision pulled under the same id: refused by name
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder / "snapshots" / first, folder / "snapshots" / second)
    (folder / "refs" / "main").write_text(second)
    with pytest.raises(ValueError, match=f"input teacher: '{repo}@{first}' -> '{repo}@{second}'"):
        check_run_dir(run, cfg, input_fingerprints(cfg))
    with pytest.raises(ValueError, match=f"made_by.teacher: '{repo}@{first}' -> '{repo}@{second}'"):
        check_pairs_record(pairs, {"made_by": {"teacher": model_fingerprint(repo)}, "rows": 8})
    # a recorded commit the cache no longer resolves (cleared, or another cache read): refused, saying where to look
    (run / "inputs.json").write_text(json.dumps({**input_fingerprints(cfg), "teacher": f"{repo}@{first}"}))
    shutil.rmtree(cache)
    with pytest.raises(ValueError, match=f"input teacher: '{repo}@{first}' -> '{repo}'(.|\n)*has no {repo} as "
                                         f"`main` at {first}"):
        check_run_dir(run, cfg, input_fingerprints(cfg))


def test_a_hub_id_loads_at_the_revision_its_fingerprint_names(tiny_teacher, tmp_path, monkeypatch):
    import diffusers
    import huggingface_hub.constants

    from slimdit.pipelines.loading import load_pipeline
    from tests.test_layouts import _hub_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_cache(tmp_path / "hub", "someone/tiny-pipeline", Path(tiny_teacher))
    seen = {}

    def from_pretrained(src, **kwargs):  # online, diffusers would otherwise fetch the newest main
        seen.update(src=src, **kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(FileNotFoundError, match="stop here"):
        load_pipeline("someone/tiny-pipeline", "cpu")
    assert seen == {"src": "someone/tiny-pipeline", "revision": "0" * 40}

    # a student of that base, saved while main was at commit 0: it loads that commit though main has moved on
    from slimdit.pipelines.loading import BASE_FILE

    student = tmp_path / "student"
    shutil.copytree(Path(tiny_teacher) / "transformer", student / "transformer")
    (student / BASE_FILE).write_text(json.dumps({"base": "someone/tiny-pipeline",
                                                 "base_fingerprint": f"someone/tiny-pipeline@{'0' * 40}"}))
    folder = tmp_path / "hub" / "models--someone--tiny-pipeline"
    shutil.copytree(folder / "snapshots" / ("0" * 40), folder / "snapshots" / ("1" * 40))
    (folder / "refs" / "main").write_text("1" * 40)
    with pytest.raises(FileNotFoundError, match="stop here"):
        load_pipeline(str(student), "cpu")
    assert seen["revision"] == "0" * 40
    from slimdit.reports.card import _loading  # its card's plain-diffusers lines load that commit too

    line = f'from_pretrained("someone/tiny-pipeline", transformer=transformer, revision="{"0" * 40}")'
    assert line in _loading(student, lowrank=False)
    shutil.rmtree(folder / "snapshots" / ("0" * 40))  # no longer cached: main's commit (and the warning)
    with pytest.raises(FileNotFoundError, match="stop here"):
        load_pipeline(str(student), "cpu")
    assert seen["revision"] == "1" * 40


def test_a_run_on_a_hub_id_downloaded_at_its_start_records_the_commit_that_loaded(tiny_teacher, tmp_path,
                                                                                   monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    from slimdit.config import DistillConfig
    from slimdit.identity import check_run_dir, input_fingerprints, record_revisions
    from slimdit.speed.shapes import read_model_file
    from tests.test_layouts import _hub_cache

    cache, repo = tmp_path / "hub", "someone/tiny-pipeline"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cfg = DistillConfig.model_validate({"teacher": repo, "plan": {"units": {}}, "out": str(tmp_path / "run"),
                                        "data": {"real": "shapes-train:8"}})
    inputs = input_fingerprints(cfg)
    assert inputs["teacher"] == repo  # nothing cached yet: recorded bare
    check_run_dir(cfg.out, cfg, inputs)
    _hub_cache(cache, repo, Path(tiny_teacher))  # what the teacher's load downloads
    now = record_revisions(cfg.out, cfg, inputs)
    recorded = json.loads((tmp_path / "run" / "inputs.json").read_text())["teacher"]
    assert now["teacher"] == recorded == f"{repo}@{'0' * 40}"
    assert record_revisions(cfg.out, cfg, now) is now  # nothing bare left: nothing recomputed

    asked = {}

    def download(repo_id, filename, **kwargs):  # online, an unpinned read would move the cache to a newer main
        asked.update(kwargs)
        return str(Path(tiny_teacher) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert json.loads(read_model_file(repo, "model_index.json"))["_class_name"]
    assert asked == {"revision": "0" * 40}


def test_records_digested_from_the_inputs_read_the_same_before_and_after_a_hub_id_gains_its_revision(tmp_path):
    from slimdit.config import DistillConfig
    from slimdit.schedules.run import _made_by

    cfg = DistillConfig.model_validate({"teacher": "someone/tiny-pipeline", "plan": {"units": {}},
                                        "out": str(tmp_path / "run"), "data": {"real": "shapes-train:8"}})
    bare = {"teacher": "someone/tiny-pipeline", "data.real": "shapes-train:8"}
    assert _made_by(cfg, bare) == _made_by(cfg, {**bare, "teacher": f"someone/tiny-pipeline@{'0' * 40}"})
    assert _made_by(cfg, bare) != _made_by(cfg, {**bare, "teacher": "someone/other"})


def test_grasp_factors_are_made_by_the_same_inputs_before_and_after_a_hub_id_gains_its_revision(tmp_path):
    from slimdit.compress.plan import Plan
    from slimdit.config import DistillConfig
    from slimdit.distill.run import grasp_made_by

    cfg = DistillConfig.model_validate({"teacher": "someone/tiny-pipeline", "plan": {"units": {}},
                                        "out": str(tmp_path / "run"), "data": {"real": "shapes-train:8"}})
    plan = Plan.from_dict(cfg.plan)
    bare = {"teacher": "someone/tiny-pipeline", "data.real": "shapes-train:8"}
    gained = {**bare, "teacher": f"someone/tiny-pipeline@{'0' * 40}"}
    assert grasp_made_by(cfg, plan, bare) == grasp_made_by(cfg, plan, gained)  # kept: not factored again
    assert grasp_made_by(cfg, plan, bare) != grasp_made_by(cfg, plan, {**bare, "teacher": "someone/other"})


def test_the_demos_analysis_is_kept_when_its_hub_teacher_gains_its_revision(tmp_path, monkeypatch):
    import slimdit.demo
    import slimdit.importance.analyze
    import slimdit.schedules.run
    from slimdit.demo import run_demo

    made = []
    monkeypatch.setattr(slimdit.importance.analyze, "analyze", lambda *a, **k: made.append(1))

    def schedule(*args, **kwargs):  # the schedule fails: the run holds no work and may be taken over
        raise RuntimeError("stopped after the analysis")

    monkeypatch.setattr(slimdit.schedules.run, "run_schedule", schedule)
    repo = "someone/tiny-pipeline"
    for teacher in (repo, f"{repo}@{'3' * 40}"):  # recorded bare, then with the commit the cache resolves
        monkeypatch.setattr(slimdit.demo, "input_fingerprints", lambda cfg, t=teacher: {"teacher": t})
        with pytest.raises(RuntimeError, match="stopped after the analysis"):
            run_demo(tmp_path / "demo", progress=False)
    assert len(made) == 1


def test_a_synthetic_set_recorded_with_a_bare_hub_id_continues_and_gains_the_revision(tmp_path):
    from slimdit.data.synth import _check_folder

    repo, rev = "someone/tiny-pipeline", "2" * 40
    record = {"model": repo, "weights": f"{repo}@{rev}", "prompts": None, "seed": 0}
    (tmp_path / "synth.json").write_text(json.dumps({**record, "weights": repo}))
    assert _check_folder(tmp_path, record, ["a"]) == 0
    assert json.loads((tmp_path / "synth.json").read_text())["weights"] == f"{repo}@{rev}"
    with pytest.raises(ValueError, match="weights"):
        _check_folder(tmp_path, {**record, "weights": f"{repo}@{'3' * 40}"}, ["a"])


def test_a_saved_evaluation_is_reused_only_when_scored_as_it_would_be_now(tmp_path, monkeypatch):
    from slimdit.metrics.benchmarks import BENCHMARKS, Benchmark
    from slimdit.metrics.evaluate import saved_metrics
    from slimdit.worlds.shapes.benchmark import scorer_digest

    path = tmp_path / "teacher.json"
    assert saved_metrics(path, "shapes-geneval") is None  # not made yet
    for scored_by, reused in ((scorer_digest(), True), ("an older detector", False), (None, False)):
        path.write_text(json.dumps({"overall": 0.5, **({"scored_by": scored_by} if scored_by else {})}))
        assert (saved_metrics(path, "shapes-geneval") is not None) is reused
    # a benchmark that records no scorer keeps what is there, as before
    monkeypatch.setitem(BENCHMARKS, "unscored", Benchmark(run=lambda *a, **k: None, check=lambda *a, **k: None))
    assert saved_metrics(path, "unscored") == {"overall": 0.5}


def test_the_shapes_scorer_digest_follows_the_detector_and_the_embedder(tmp_path):
    import slimdit
    from slimdit.worlds.shapes.benchmark import _SCORING_SOURCES, scorer_digest, scoring_digest
    from slimdit.worlds.shapes.embedder import builtin_embedder_dir

    package = Path(slimdit.__file__).parent
    for name in _SCORING_SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / name, tmp_path / name)
    embedder = tmp_path / "embedder"
    shutil.copytree(builtin_embedder_dir(), embedder)
    assert scoring_digest(tmp_path, embedder) == scorer_digest()  # the same files: the same scorer
    with (tmp_path / "worlds/shapes/detector.py").open("a") as f:
        f.write("MIN_AREA = 9\n")
    changed = scoring_digest(tmp_path, embedder)
    assert changed != scorer_digest()
    crlf = (package / "worlds/shapes/detector.py").read_bytes().replace(b"\n", b"\r\n")
    (tmp_path / "worlds/shapes/detector.py").write_bytes(crlf)  # a checkout with other line endings: the same
    assert scoring_digest(tmp_path, embedder) == scorer_digest()
    source = (package / "worlds/shapes/detector.py").read_text()
    prose = source.replace('"""', '"""A note. ', 1) + "# a comment\n"  # a docstring and a comment edited
    (tmp_path / "worlds/shapes/detector.py").write_text(prose)
    assert scoring_digest(tmp_path, embedder) == scorer_digest()
    weights = next(p for p in embedder.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert scoring_digest(tmp_path, embedder) not in (scorer_digest(), changed)


def test_an_external_benchmarks_scorer_follows_its_adapters_code(tmp_path):
    import slimdit
    from slimdit.metrics.benchmarks import BENCHMARKS, code_digest
    from slimdit.metrics.evaluate import saved_metrics
    from slimdit.metrics.external.hpsv2 import make_hpsv2
    from slimdit.metrics.external.protocol import adapter_sources

    package = Path(slimdit.__file__).parent
    names = adapter_sources("hpsv2")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / name, tmp_path / name)
    official = BENCHMARKS["hpsv2"].scorer()
    assert code_digest(tmp_path, names) == official  # the same code: the same scorer
    with (tmp_path / "metrics/external/protocol.py").open("a") as f:  # the shared protocol changed
        f.write("CHUNK = 81\n")
    assert code_digest(tmp_path, names) != official
    # each adapter is its own scorer; a stand-in model is none (its scores are the caller's)
    external = ("fid", "cmmd", "hpsv2", "imagereward", "geneval", "dpg-bench")
    assert len({BENCHMARKS[n].scorer() for n in external}) == len(external)
    assert make_hpsv2(scorer=lambda images, prompts: [0.0] * len(images)).scorer is None
    # a score saved before the adapters recorded their scorer is made again; one scored as now is reused
    path = tmp_path / "hps.json"
    path.write_text(json.dumps({"overall": 0.27}))
    assert saved_metrics(path, "hpsv2") is None
    path.write_text(json.dumps({"overall": 0.27, "scored_by": official}))
    assert saved_metrics(path, "hpsv2") == {"overall": 0.27, "scored_by": official}


def test_an_evaluation_records_its_scorer(tmp_path):
    from slimdit.metrics.evaluate import evaluate_model
    from slimdit.worlds.shapes.benchmark import scorer_digest

    m = evaluate_model("shapes-oracle", limit=6, images_per_prompt=1, out=tmp_path / "oracle.json").metrics
    assert m["scored_by"] == scorer_digest()
    assert json.loads((tmp_path / "oracle.json").read_text())["scored_by"] == scorer_digest()


def _stub_evaluations(monkeypatch, scored_by: str) -> list[str]:
    """evaluate_model replaced by one that writes a fixed score under ``scored_by``; returns the models it scored."""
    from types import SimpleNamespace

    import slimdit.metrics.evaluate

    scored = []

    def evaluate(model, benchmark, out=None, **kwargs):
        scored.append(model)
        m = {"overall": 0.5, "fid": 1.0, "scored_by": scored_by}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(m))
        return SimpleNamespace(metrics=m)

    monkeypatch.setattr(slimdit.metrics.evaluate, "evaluate_model", evaluate)
    return scored


@pytest.mark.parametrize("kind", ["distill", "steps", "reward"])
def test_a_runs_evaluation_scored_by_another_scorer_is_made_again_and_one_scored_as_now_is_kept(kind, tmp_path,
                                                                                               monkeypatch):
    from types import SimpleNamespace

    from slimdit.config import DistillConfig, EvalSection
    from slimdit.worlds.shapes.benchmark import scorer_digest

    scored = _stub_evaluations(monkeypatch, scorer_digest())
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    if kind == "distill":
        from slimdit.distill.run import _evaluate

        cfg = DistillConfig.model_validate({"teacher": "shapes-pixart", "plan": {"units": {}}, "out": str(run),
                                            "data": {"real": "shapes-train:8"}, "eval": {"untrained": False}})
        first, second = "teacher", "student"
    else:
        from slimdit.distill.fewstep import _evaluate as steps_evaluate
        from slimdit.distill.reward import _evaluate as reward_evaluate

        _evaluate = steps_evaluate if kind == "steps" else reward_evaluate
        cfg = SimpleNamespace(teacher="shapes-pixart", baseline=None, eval=EvalSection())
        first, second = ("teacher", "student") if kind == "steps" else ("before", "after")
    (run / "metrics" / f"{first}.json").write_text(json.dumps({"overall": 0.9, "scored_by": "an older detector"}))
    (run / "metrics" / f"{second}.json").write_text(json.dumps({"overall": 0.4, "fid": 1.0,
                                                                 "scored_by": scorer_digest()}))
    out = _evaluate(cfg, run)
    assert scored == ["shapes-pixart"]  # the teacher scored again; the student's score kept
    assert json.loads((run / "metrics" / f"{first}.json").read_text())["scored_by"] == scorer_digest()
    assert out[f"{first}_metrics"]["overall"] == 0.5 and out[f"{second}_metrics"]["overall"] == 0.4


def test_shared_evaluations_are_keyed_by_their_scorer(tmp_path, monkeypatch):
    import dataclasses

    from slimdit.config import DistillConfig
    from slimdit.distill.run import _evaluate
    from slimdit.metrics.benchmarks import BENCHMARKS

    shared = tmp_path / "shared"
    names = []
    for scorer in ("today's detector", "a newer detector"):
        monkeypatch.setitem(BENCHMARKS, "shapes-geneval",
                            dataclasses.replace(BENCHMARKS["shapes-geneval"], scorer=lambda s=scorer: s))
        scored = _stub_evaluations(monkeypatch, scorer)
        for run in (tmp_path / f"{scorer}-1", tmp_path / f"{scorer}-2"):  # two runs of one teacher, one folder
            (run / "metrics").mkdir(parents=True)
            (run / "plan.json").write_text(json.dumps({"plan": {"units": {}}}))
            (run / "metrics" / "student.json").write_text(json.dumps({"overall": 0.4, "scored_by": scorer}))
            cfg = DistillConfig.model_validate({"teacher": "shapes-pixart", "plan": {"units": {}}, "out": str(run),
                                                "data": {"real": "shapes-train:8"},
                                                "eval": {"untrained": False, "shared": str(shared)}})
            _evaluate(cfg, run)
        assert scored == ["shapes-pixart"]  # once per scorer: the second run reuses the first's, never the old's
        names.append(sorted(p.name for p in shared.iterdir()))
    assert len(names[0]) == 1 and len(names[1]) == 2
