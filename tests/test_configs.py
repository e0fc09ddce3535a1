"""Every config the repository ships reads back with its command's schema, so a field renamed or removed in the
code cannot leave a documented command broken until someone runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slimdit.compress.plan import Plan
from slimdit.config import DistillConfig, RunConfig, load_config
from slimdit.distill.chain import ChainConfig, is_chain, link_configs
from slimdit.distill.fewstep import StepsConfig
from slimdit.distill.reward import RewardConfig
from slimdit.experiments.sweep import load_sweep
from slimdit.registry import MODELS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {"reward": RewardConfig, "steps": StepsConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")) + sorted(CONFIGS.glob("*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_a_shipped_config_reads_with_its_commands_schema(path):
    kind = path.parent.name
    if kind == "plans":
        assert Plan.load(path).ops
    elif kind == "sweeps":
        try:
            assert load_sweep(path)[1]
        except ValueError as e:  # a sweep over another command's output, which its header says to run first
            # (load_sweep stops at the first point it refuses, so such a sweep's later points go unchecked)
            missing = re.search(r"plan file (runs/\S+)/[^/\s]+ does not exist", str(e))
            assert missing and f"--out {missing.group(1)}" in path.read_text(), str(e)
    elif kind == "steps" and is_chain(path):  # every link checked, its models made by earlier links
        chain = load_config(path, ChainConfig)
        links = link_configs(chain, path.parent)
        assert len(links) == len(chain.chain)
        inside = str((Path(chain.out) / "links").absolute())
        for name, link in links:  # each model a registered one or an earlier link's, never a run left in runs/
            for model in filter(None, (link.teacher, link.student)):
                assert model in MODELS or str(Path(model).absolute()).startswith(inside), (name, model)
    elif kind in SCHEMAS:
        assert load_config(path, SCHEMAS[kind]).out
    elif kind == "accelerate":
        assert "num_processes" in path.read_text()
    else:  # the top level: a distillation or a schedule run
        schema = RunConfig if "schedule" in path.name else DistillConfig
        assert load_config(path, schema).out


def test_the_demo_fits_its_stages_to_another_teacher_unless_told():
    """The packaged demo's fixed units per stage are for shapes-pixart's equal blocks; another teacher gets
    ``auto`` (eq. 4.21 per stage), and an explicit ``--set`` still wins."""
    from slimdit.demo import demo_config

    assert demo_config("x").schedule.units_per_stage == 6
    assert demo_config("x", {"teacher": "shapes-pixart"}).schedule.units_per_stage == 6
    assert demo_config("x", {"teacher": "shapes-flux"}).schedule.units_per_stage == "auto"
    told = demo_config("x", {"teacher": "shapes-flux", "schedule.units_per_stage": 3})
    assert (told.teacher, told.schedule.units_per_stage, told.schedule.target) == ("shapes-flux", 3, 0.6)
