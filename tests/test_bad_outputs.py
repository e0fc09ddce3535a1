"""Bad outputs and bad paths: unwritable outputs fail before any model is loaded, OS errors end a command with one
line naming the path, eval still prints metrics it could not write, mistyped model directories are not taken for hub
ids, and metadata rows cannot point outside their folder."""

from __future__ import annotations

import errno
import importlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from slimdit.cli import main
from slimdit.data.datasets import image_folder
from slimdit.errors import OutputError
from slimdit.io import ensure_writable
from slimdit.metrics.evaluate import evaluate_model
from slimdit.pipelines.loading import resolve_model_dir

FAST_EVAL = ["eval", "--model", "shapes-oracle", "--limit", "6", "--images-per-prompt", "1"]


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the output was checked")


@pytest.fixture
def blocked(tmp_path):
    """An output path that cannot be created, even by root: its parent is a regular file."""
    f = tmp_path / "a-file"
    f.write_text("not a directory\n")
    return f / "out"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimdit: error: "), err
    assert "Traceback" not in err
    return lines[0]


# 1. outputs are checked before heavy work

def test_ensure_writable_creates_the_directory_and_leaves_no_probe(tmp_path):
    d = tmp_path / "new" / "dir"
    assert ensure_writable(d, "test --out") == d and d.is_dir() and list(d.iterdir()) == []
    f = tmp_path / "other" / "metrics.json"
    ensure_writable(f, "eval --out", is_dir=False)
    assert f.parent.is_dir() and not f.exists() and list(f.parent.iterdir()) == []


def test_ensure_writable_names_the_path_and_the_reason(blocked, tmp_path):
    with pytest.raises(OutputError, match=f"^cannot write eval --out {blocked}/m.json: Not a directory$"):
        ensure_writable(blocked / "m.json", "eval --out", is_dir=False)
    with pytest.raises(OutputError, match=f"^cannot write generate --out {blocked}: Not a directory$"):
        ensure_writable(blocked, "generate --out")
    with pytest.raises(OutputError, match="Is a directory"):  # a file output that is an existing directory
        ensure_writable(tmp_path, "eval --out", is_dir=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0o555 directory anyway")
def test_ensure_writable_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write eval --out {ro}/m.json: Permission denied"):
            ensure_writable(ro / "m.json", "eval --out", is_dir=False)
        assert main([*FAST_EVAL, "--out", str(ro / "m.json")]) == 1
    finally:
        ro.chmod(0o755)


def _argv(command: str, out: str, tmp_path) -> list[str]:
    plan = tmp_path / "plan.yaml"
    plan.write_text("units:\n  block.0: remove\n")
    return {
        "eval": [*FAST_EVAL, "--out", f"{out}/metrics.json"],
        "eval-images": [*FAST_EVAL, "--save-images", out],
        "generate": ["generate", "--model", "shapes-pixart", "--prompt", "a red circle", "--out", out],
        "compress": ["compress", "--model", "shapes-pixart", "--plan", str(plan), "--out", out],
        "export": ["export", "--model", "shapes-pixart", "--merge", "--out", out],
        "synth": ["synth", "--model", "shapes-pixart", "--prompts", "shapes-train:2", "--out", out],
        "analyze": ["analyze", "--model", "shapes-pixart", "--criteria", "magnitude", "--prompts", "shapes-train:2",
                    "--out", out],
        "search": ["search", "--model", "shapes-pixart", "--units", "1", "--method", "greedy", "--prompts",
                   "shapes-train:2", "--out", out],
    }[command]


LOADERS = ["slimdit.metrics.evaluate.load_sampler", "slimdit.metrics.evaluate.get_embedder",
           "slimdit.pipelines.generate.load_sampler", "slimdit.compress.student.load_pipeline",
           "slimdit.pipelines.loading.load_sampler", "slimdit.pipelines.loading.load_pipeline",
           "slimdit.importance.analyze.load_pipeline"]
WHAT = {"eval": "eval --out", "eval-images": "eval --save-images", "generate": "generate --out",
        "compress": "compress --out", "export": "export --out", "synth": "synth --out", "analyze": "analyze --out",
        "search": "search --out"}


@pytest.mark.parametrize("command", list(WHAT))
def test_unwritable_out_fails_before_any_model_is_loaded(command, blocked, tmp_path, monkeypatch, capsys):
    for target in LOADERS:  # import every module first: one imported after a patch would bind the spy for good
        importlib.import_module(target.rsplit(".", 1)[0])
    for target in LOADERS:
        monkeypatch.setattr(target, _no_model)
    assert main(_argv(command, str(blocked), tmp_path)) == 1
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert line.startswith(f"slimdit: error: cannot write {WHAT[command]} {blocked}") and line.endswith(
        ": Not a directory")
    assert out == ""


# 2. an OSError anywhere becomes one line naming the path

def test_os_error_mid_command_is_one_line_naming_the_path(tmp_path, capsys):
    plan_dir = tmp_path / "plan-is-a-dir"
    plan_dir.mkdir()
    assert main(["compress", "--model", "shapes-pixart", "--plan", str(plan_dir), "--dry-run"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"slimdit: error: {plan_dir}: Is a directory"


def test_os_error_without_a_path_and_our_own_messages(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("slimdit.cli.cmd_report", full)
    assert main(["report", str(tmp_path)]) == 2
    assert _one_error_line(capsys.readouterr().err) == "slimdit: error: No space left on device"
    monkeypatch.undo()
    assert main(["report", str(tmp_path / "nothing")]) == 2  # a FileNotFoundError we raise keeps its message
    assert _one_error_line(capsys.readouterr().err).endswith("has no summary.json: not a finished run directory")


# 3. eval prints the metrics it could not write

def _disk_full(path, obj):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_evaluate_model_hands_back_metrics_it_could_not_write(tmp_path, monkeypatch):
    out = tmp_path / "metrics.json"
    monkeypatch.setattr("slimdit.metrics.evaluate.write_json", _disk_full)
    with pytest.raises(OutputError, match=f"^cannot write eval --out {out}: No space left on device$") as e:
        evaluate_model("shapes-oracle", out=out, limit=6, images_per_prompt=1)
    m = e.value.payload
    assert m["n_images"] == 6 and m["overall"] >= 0.99 and m["model"] == "shapes-oracle" and not out.exists()


def test_eval_prints_metrics_when_the_disk_fills(tmp_path, monkeypatch, capsys):
    out = tmp_path / "metrics.json"
    monkeypatch.setattr("slimdit.metrics.evaluate.write_json", _disk_full)
    assert main([*FAST_EVAL, "--out", str(out)]) == 1
    stdout, stderr = capsys.readouterr()
    metrics = json.loads(stdout)  # the whole of stdout is the metrics JSON
    assert metrics["n_images"] == 6 and metrics["overall"] >= 0.99 and {"fid", "cmmd"} <= set(metrics)
    assert _one_error_line(stderr) == f"slimdit: error: cannot write eval --out {out}: No space left on device"
    assert not out.exists()


# 4. a mistyped local directory is not a hub id

def test_mistyped_local_directory_is_not_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "student").mkdir(parents=True)
    (tmp_path / "runs" / "teacher").mkdir()
    with pytest.raises(FileNotFoundError, match=r"runs/studnt does not exist.*did you mean runs/student\?$"):
        resolve_model_dir("runs/studnt")
    with pytest.raises(FileNotFoundError, match=r"runs/ has no 'zzz'") as e:
        resolve_model_dir("runs/zzz")
    assert "did you mean" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"runs/student/ has no 'transformr'"):
        resolve_model_dir("runs/student/transformr/x")
    assert resolve_model_dir("PixArt-alpha/PixArt-Sigma-XL-2-512-MS") == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
    assert main(["eval", "--model", "runs/studnt", "--limit", "6"]) == 2
    assert "did you mean runs/student?" in _one_error_line(capsys.readouterr().err)


# 5. metadata rows cannot point outside their folder

@pytest.mark.parametrize("name", ["../elsewhere.png", "/tmp/elsewhere.png", "sub/../../elsewhere.png"])
def test_metadata_file_name_outside_the_folder_is_rejected(tmp_path, name):
    folder = tmp_path / "data"
    folder.mkdir()
    img = np.zeros((4, 4, 3), np.uint8)
    Image.fromarray(img).save(folder / "a.png")
    Image.fromarray(img).save(tmp_path / "elsewhere.png")  # exists: the row must be refused, not read
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": name, "text": "b"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"metadata.jsonl:2: file_name '{name}' is outside"):
        image_folder(folder)
    (folder / "sub").mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "./sub/../a.png", "text": "a"}) + "\n")
    assert image_folder(folder).images.shape == (1, 4, 4, 3)  # inside, however it is spelled
