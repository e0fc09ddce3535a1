from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# one intra-op thread per process: the tests' models are tiny, and the multi-process tests (two ranks on two cores)
# would otherwise oversubscribe the cores, which slows torch's thread pools many times over
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# the tiny models many modules share, built once per session (each test writes only under its own tmp_path)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny shapes-pixart pipeline directory (4 blocks, 2 training steps)."""
    from slimdit.worlds.shapes.teacher import TeacherConfig, export_teacher, train_teacher
    from tests.test_teacher import TINY

    d = tmp_path_factory.mktemp("teacher")
    run = train_teacher(d / "run", TeacherConfig(steps=2, **{**TINY, "num_layers": 4}))
    return str(export_teacher(run, d / "pipe"))


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory):
    """A tiny real FluxPipeline directory (1 double + 2 single blocks, tiny CLIP and T5, AutoencoderKL)."""
    import json

    import torch

    from slimdit.worlds.shapes.flux import SAMPLING, FluxShape, build_pipeline

    torch.manual_seed(0)
    shape = FluxShape(double=1, single=2, heads=2, head_dim=8, t5_dim=16, t5_layers=1, clip_dim=16, vae_width=8,
                      guidance_embeds=True)
    d = tmp_path_factory.mktemp("flux") / "tiny-flux"
    build_pipeline(shape).save_pretrained(d)
    (d / "slimdit.json").write_text(json.dumps({"sampling": {**SAMPLING, "num_inference_steps": 2}}))
    return d
