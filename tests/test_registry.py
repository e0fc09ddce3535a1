"""The core never imports a world; the shapes world reaches the core only through the registries."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import slimdit
from slimdit import registry

SRC = Path(slimdit.__file__).parent
WORLDS = SRC / "worlds"


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from slimdit import worlds
    return names


def _core_modules(*outside: Path) -> dict[str, ast.AST]:
    """Every package module not under one of ``outside``, parsed, by its path inside the package."""
    return {str(p.relative_to(SRC)): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))
            if not any(d in p.parents for d in outside)}


def test_the_core_imports_no_world():
    core = _core_modules(WORLDS)
    assert len(core) > 20 and "registry.py" in core
    offenders = {p: sorted(m for m in _imported_modules(tree)
                           if m == "slimdit.worlds" or m.startswith("slimdit.worlds."))
                 for p, tree in core.items()}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_import_check_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from slimdit.worlds.shapes.oracle import OracleSampler\n"
                     "def g():\n    import slimdit.worlds.shapes.pixel_vae\n"
                     "from slimdit import worlds\n")
    assert {"slimdit.worlds.shapes.oracle", "slimdit.worlds.shapes.pixel_vae", "slimdit.worlds"} <= \
        _imported_modules(tree)


def test_the_shapes_world_registers_its_names():
    registry.load_worlds()
    assert "shapes-pixart" in registry.MODELS and registry.MODELS["shapes-pixart"]().is_dir()
    flux = registry.MODELS["shapes-flux"]()  # the guidance-distilled Flux: one pass per step, no true CFG
    assert json.loads((flux / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert json.loads((flux / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    assert "shapes-oracle" in registry.SAMPLERS
    assert "shapes-geneval" in registry.BENCHMARKS
    assert "shapes" in registry.EMBEDDERS
    assert "shapes-train" in registry.DATASETS
    assert "teacher" in registry.COMMANDS


def test_dataset_specs_come_from_the_registry():
    from slimdit.data.datasets import load_dataset

    assert registry.is_spec("shapes-train:4:7") and registry.is_spec("shapes-train:")
    assert not registry.is_spec("shapes-train") and not registry.is_spec("runs/synth")
    assert not registry.is_spec("no-such-spec:4")
    data = load_dataset("shapes-train:3:7")
    assert len(data.captions) == 3 and data.images.shape[0] == 3 and data.source == "shapes-train:3:7"
    with pytest.raises(ValueError, match="expected shapes-train:N"):
        load_dataset("shapes-train:x")
    with pytest.raises(FileNotFoundError, match="neither shapes-train:N nor an existing folder"):
        load_dataset("no-such-spec:4")


def test_a_dataset_spec_can_keep_only_some_categories():
    from slimdit.data.datasets import load_dataset
    from slimdit.worlds.shapes.prompts import TrainingSet, parse_prompt

    data = load_dataset("shapes-train:5:7:position,counting")
    assert len(data.captions) == 5 and data.images.shape[0] == 5
    assert data.source == "shapes-train:5:7:position,counting"
    assert {parse_prompt(c).category for c in data.captions} <= {"position", "counting"}
    # the same rows of the same stream, in order: the unfiltered stream's position and counting items
    stream = TrainingSet(7)
    kept = [stream.item(i) for i in range(200) if stream.scene(i)[0].category in ("position", "counting")][:5]
    assert data.captions == [c for c, _ in kept]
    assert (data.images == [im for _, im in kept]).all()
    with pytest.raises(ValueError, match="unknown category 'pos'"):
        load_dataset("shapes-train:5:7:pos")


def test_the_registered_benchmark_checks_its_limit_before_any_model():
    bench = registry.BENCHMARKS["shapes-geneval"]
    with pytest.raises(ValueError, match="--limit must be between 1 and"):
        bench.check(0)
    bench.check(6)


# Attribute, module and call-keyword names only a PixArt or Flux transformer or pipeline has. The core outside
# models/ reaches them through the adapter; this list is what a slip would most likely name.
MODEL_INTERNALS = {
    "transformer_blocks", "single_transformer_blocks", "caption_projection", "adaln_single", "context_embedder",
    "time_text_embed", "x_embedder", "ff_context", "add_q_proj", "norm1_context", "proj_mlp",
    "encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "prompt_attention_mask",
    "added_cond_kwargs", "guidance_embeds", "txt_ids", "img_ids", "true_cfg_scale", "_pack_latents",
    "_unpack_latents", "_prepare_latent_image_ids", "encode_prompt",
}


def _code_names(tree: ast.AST) -> set[str]:
    """Names the code uses (identifiers, attributes, keywords, string constants), docstrings and comments left out."""
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


def test_the_core_names_no_model_internals():
    core = _core_modules(WORLDS, SRC / "models")
    assert len(core) > 20
    offenders = {p: sorted(_code_names(tree) & MODEL_INTERNALS) for p, tree in core.items()}
    assert {p: n for p, n in offenders.items() if n} == {}


def test_the_internals_check_sees_attributes_keywords_and_strings_but_not_docstrings():
    tree = ast.parse('"""transformer_blocks in a docstring"""\n'
                     "def f(m, pipe):\n    '''img_ids'''\n    m.single_transformer_blocks[0]\n"
                     "    pipe(true_cfg_scale=1)\n    return {'pooled_projections': 0}\n")
    assert _code_names(tree) & MODEL_INTERNALS == {"single_transformer_blocks", "true_cfg_scale",
                                                     "pooled_projections"}
