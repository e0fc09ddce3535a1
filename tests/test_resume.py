"""A run killed anywhere and rerun ends bit-identical to an uninterrupted one, through every path: conditioning
computed fresh or reloaded from ``cache/``, a kill in any phase of ``distill`` or any stage of ``run``, and its
``metrics.jsonl`` holds each step once with the same values."""

from __future__ import annotations

import json

import pytest
import torch

from slimdit.distill.trainer import Trainer
from slimdit.io import load_tensors
from tests.test_schedules import _cfg


class Killed(BaseException):
    """A simulated kill: not an Exception, so nothing in slimdit may catch it."""


def kill_at(monkeypatch, n: int, target=Trainer, name: str = "_optimizer_step") -> None:
    """Make the ``n``-th call (1-based, over the whole run) of ``target.name`` die before it does anything."""
    original, calls = getattr(target, name), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Killed(f"killed at call {n} of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


def weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        out.update({f"{f.relative_to(path)}:{k}": v for k, v in load_tensors(f).items()})
    return out


def logs(run) -> dict[str, list[dict]]:
    """Every metrics.jsonl of a run, without the wall-clock throughput."""
    return {str(f.relative_to(run)): [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"}
                                      for x in f.read_text().splitlines()]
            for f in sorted(run.rglob("metrics.jsonl"))}


def assert_same_run(a, b) -> None:
    wa, wb = weights(a / "student"), weights(b / "student")
    assert wa.keys() == wb.keys() and wa
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"
    la, lb = logs(a), logs(b)
    assert la == lb
    for rows in lb.values():
        steps = [r["step"] for r in rows if "total" in r and "phase" not in r]
        assert steps == sorted(set(steps))  # each logged step once


def test_resumed_trainer_logs_what_an_uninterrupted_one_logs(tmp_path, monkeypatch):
    from slimdit.distill.trainer import TrainConfig
    from slimdit.models import adapter_for
    from tests.test_trainer import CFG, SCHED, _data, _student

    cfg = TrainConfig(**{**CFG, "steps": 8, "checkpoint_every": 4, "log_every": 3})
    teacher, student, kept = _student()
    Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "a", kept).train(progress=False)
    teacher, student, kept = _student()
    kill_at(monkeypatch, 7)  # at step 7: the row of step 6 was logged after the checkpoint of step 4
    with pytest.raises(Killed):
        Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "b", kept).train(progress=False)
    monkeypatch.undo()
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    teacher, student, kept = _student()
    Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "b", kept).train(progress=False)
    a, b = logs(tmp_path / "a"), logs(tmp_path / "b")
    assert [r["step"] for r in b["metrics.jsonl"]] == [3, 6, 8]
    assert a == b  # the step-6 mean spans steps 4-6 although the resume started at 5


def test_skipped_steps_stay_counted_across_a_resume(tmp_path, monkeypatch):
    from slimdit.distill.trainer import TrainConfig
    from slimdit.errors import TrainingDiverged
    from slimdit.models import adapter_for
    from tests.test_trainer import CFG, SCHED, _data, _student

    data = _data()
    data.latents[[3, 11]] = float("nan")
    teacher, student, kept = _student()
    base = {**CFG, "steps": 12, "ema_decay": None, "checkpoint_every": 1}
    probe = Trainer(adapter_for(student, SCHED), teacher, student, data, TrainConfig(**base), tmp_path / "p", kept)
    bad = [s + 1 for s in range(12) if not torch.isfinite(probe._batch(s, 0)[0]).all()]
    assert len(bad) >= 2 and bad[0] + 1 < bad[-1], bad
    cfg = TrainConfig(**{**base, "max_skipped_steps": len(bad) - 1})
    kill_at(monkeypatch, bad[0] + 1)  # after the first skip was checkpointed
    teacher, student, kept = _student()
    with pytest.raises(Killed):
        Trainer(adapter_for(student, SCHED), teacher, student, data, cfg, tmp_path / "r", kept).train(progress=False)
    monkeypatch.undo()
    teacher, student, kept = _student()
    with pytest.raises(TrainingDiverged, match=f"at step {bad[-1]} "):  # not later: the skip was remembered
        Trainer(adapter_for(student, SCHED), teacher, student, data, cfg, tmp_path / "r", kept).train(progress=False)


def distill_cfg(teacher, out) -> dict:
    return {"teacher": teacher, "out": str(out), "plan": {"units": {"block.1": "remove", "block.2": {"svd": 0.5}}},
            "protocol": "three_stage", "data": {"real": "shapes-train:16", "synth_images": 8},
            "train": {"steps": 16, "batch_size": 2, "warmup_steps": 2, "lr": 1e-3, "grad_clip": 1.0,
                      "checkpoint_every": 3, "log_every": 2, "val_every": 5, "val_prompts": 2, "ema_decay": 0.9},
            "eval": {"benchmark": None, "bench": False}}


@pytest.fixture(scope="module")
def straight_distill(tiny_teacher, tmp_path_factory):
    from slimdit.distill.run import run_distill

    return run_distill(distill_cfg(tiny_teacher, tmp_path_factory.mktemp("straight") / "run"), progress=False)


# the 3 phases take 7, 7 and 2 of the 16 steps; checkpoints every 3 steps, losses logged every 2: a kill at a
# phase's step 6 (or 5) leaves a logged row after its last checkpoint and a partial loss sum in it
@pytest.mark.parametrize("kill", [1, 6, 12, 15, "save"],
                         ids=["phase0-step1-after-cache", "phase0-step6", "phase1-step5", "phase2-step1", "final-save"])
def test_killed_distill_resumes_bit_identical(tiny_teacher, straight_distill, tmp_path, monkeypatch, kill):
    import slimdit.distill.run as distill_run

    if kill == "save":  # training finished, then the final pipeline save dies
        kill_at(monkeypatch, 1, distill_run, "save_student")
    else:
        kill_at(monkeypatch, kill)
    cfg = distill_cfg(tiny_teacher, tmp_path / "run")
    with pytest.raises(Killed):
        distill_run.run_distill(cfg, progress=False)
    assert list((tmp_path / "run" / "cache").rglob("shard_00000.safetensors"))  # the resume reloads the cache
    monkeypatch.undo()
    distill_run.run_distill(cfg, progress=False)
    assert_same_run(straight_distill, tmp_path / "run")


SCHEDULES = {"linear_progressive": dict(target=0.7, stages=2, units_per_stage=2, base_ratio=0.5, c_fixed=0.3),
             "progressive": dict(op="svd", target=0.6, stages=2, svd_ratio=0.5, cmmd_threshold=1e-12)}


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_killed_schedule_resumes_bit_identical(tiny_teacher, tmp_path, monkeypatch, kind):
    from slimdit.schedules.run import run_schedule

    def cfg(out):
        c = _cfg(tiny_teacher, out, kind=kind, **SCHEDULES[kind])
        c["train"].update(steps=4, checkpoint_every=2, log_every=1)
        c["eval"] = {"benchmark": None}
        return c

    straight = run_schedule(cfg(tmp_path / "straight"), progress=False)
    # stage 0 at its step 3 (after its checkpoint at 2); then, resumed, stage 0 ends (2 calls) and stage 1 dies
    # at its step 3
    for n in (3, 5):
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            run_schedule(cfg(tmp_path / "resumed"), progress=False)
        monkeypatch.undo()
    assert (tmp_path / "resumed" / "stages" / "00" / "done.json").exists()
    run_schedule(cfg(tmp_path / "resumed"), progress=False)
    for s in ("00", "01"):
        assert (json.loads((straight / "stages" / s / "plan.json").read_text())
                == json.loads((tmp_path / "resumed" / "stages" / s / "plan.json").read_text()))
    assert_same_run(straight, tmp_path / "resumed")
