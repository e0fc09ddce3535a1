"""Model cards: every saved student carries a README.md with the Hub's YAML header that says what was compressed,
how it was trained, what it scored beside its teacher and how to load it; a later evaluation rewrites it."""

from __future__ import annotations

import pytest
import yaml

from slimdit.io import read_json, write_json


def header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def lowrank_student(tiny_teacher, tmp_path_factory):
    from slimdit.compress.student import compress_to_dir

    out = tmp_path_factory.mktemp("compress") / "student"
    compress_to_dir(tiny_teacher, {"units": {"block.1": "remove", "block.2": {"svd": {"mlp": 0.5}}}}, out)
    return out


def test_a_compressed_student_carries_a_card_that_says_what_changed_and_how_to_load_it(lowrank_student):
    from diffusers import PixArtTransformer2DModel

    card = (lowrank_student / "README.md").read_text()
    meta = header(card)
    assert meta["library_name"] == "diffusers" and "base_model" not in meta  # the teacher is a local folder
    assert {"slimdit", "block-pruning", "low-rank", "pixart"} <= set(meta["tags"])
    assert "knowledge-distillation" not in meta["tags"] and "Not trained" in card
    record = read_json(lowrank_student / "plan.json")["record"]
    ratio = record["block_params_after"] / record["block_params_before"]
    assert f"{ratio:.1%} of the teacher's" in card
    assert "| block.1 | remove |" in card and "| block.2 | svd | mlp c = 0.5 |" in card
    for layer in record["units"][1]["layers"]:
        assert f"| {layer['path']} | {layer['shape'][0]} × {layer['shape'][1]} | {layer['rank']} |" in card
    # what the card says about loading holds: plain diffusers fails as quoted, slimdit and the merged export load
    assert "Plain diffusers cannot load this model" in card and "no file named diffusion_pytorch_model.bin" in card
    assert "slimdit.load_pipeline(" in card and "slimdit export --model" in card and "--merge --full" in card
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        PixArtTransformer2DModel.from_pretrained(lowrank_student, subfolder="transformer")


def test_the_merged_export_carries_a_card_for_plain_diffusers(lowrank_student, tmp_path):
    from diffusers import DiffusionPipeline

    from slimdit.compress.student import export_student

    dense = export_student(str(lowrank_student), tmp_path / "dense", merge=True, full=True)
    card = (dense / "README.md").read_text()
    assert "merged" in header(card)["tags"] and "dense (merged) export" in card
    assert "DiffusionPipeline.from_pretrained(" in card and "cannot load" not in card
    assert "| block.2 | svd | mlp c = 0.5 |" in card  # what was compressed comes from the student's records
    DiffusionPipeline.from_pretrained(dense)


def test_a_hub_teacher_is_the_base_model(lowrank_student, tmp_path):
    from slimdit.reports.card import render_card

    meta = header(render_card(lowrank_student, teacher="PixArt-alpha/PixArt-Sigma-XL-2-512-MS"))
    assert meta["base_model"] == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"


def test_a_distilled_student_card_names_its_training_and_is_rewritten_when_metrics_arrive(tiny_teacher, tmp_path,
                                                                                          monkeypatch):
    import slimdit.compress.grasp
    from slimdit.distill.run import run_distill
    from slimdit.reports.card import write_card

    plan = {"units": {"block.1": "remove", "block.2": {"svd": {"self_attn": {"rank": 3}}}},
            "grasp": {"images": 4, "batch_size": 2}}
    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "plan": plan,
           "protocol": [{"name": "all", "trainable": ["all"], "dataset": "real", "fraction": 1.0}],
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "kd": "hybrid", "val_every": 0},
           "eval": {"benchmark": None, "bench": False}}
    run = run_distill(cfg, progress=False)
    card = (run / "student" / "README.md").read_text()
    assert "knowledge-distillation" in header(card)["tags"]
    assert "KD preset `hybrid`" in card and "| all | 2 | all |" in card and "```yaml" in card
    assert "GRASP" in card and (run / "grasp.json").exists() and "Not evaluated yet" in card
    # an evaluation after the save (metrics/*.json), then the card is written again
    m = {"overall": 0.5, "fid": 3.0, "cmmd": 0.2, "benchmark": "shapes-geneval", "n_prompts": 6,
         "images_per_prompt": 1, "steps": 2, "guidance": 3.5, "seed": 0, "embedder": "shapes"}
    write_json(run / "metrics" / "teacher.json", m)
    write_json(run / "metrics" / "student.json", {**m, "overall": 0.4, "fid": 4.5})
    write_card(run / "student", run)
    card = (run / "student" / "README.md").read_text()
    assert "Not evaluated yet" not in card
    assert "| metric | teacher | student | student / teacher |" in card
    assert "| overall ↑ | 0.5 | 0.4 | 80.0% |" in card and "| fid ↓ | 3 | 4.5 | 150.0% |" in card
    # a rerun reuses GRASP's choice (grasp.json) and saves the student again: the card keeps the later numbers
    monkeypatch.setattr(slimdit.compress.grasp, "grasp_from_data", lambda *a: pytest.fail("GRASP ran again"))
    run_distill(cfg, progress=False)
    assert "| overall ↑ | 0.5 | 0.4 | 80.0% |" in (run / "student" / "README.md").read_text()
    # a teacher scored by an older detector than the student: the card shows both, with no ratio between them
    write_json(run / "metrics" / "teacher.json", {**m, "scored_by": "an older detector"})
    write_json(run / "metrics" / "student.json", {**m, "overall": 0.4, "scored_by": "today's detector"})
    write_card(run / "student", run)
    card = (run / "student" / "README.md").read_text()
    assert "| metric | teacher | student |\n" in card and "| overall ↑ | 0.5 | 0.4 |\n" in card
    assert "scored by different scorers (an older detector, today's detector)" in card
