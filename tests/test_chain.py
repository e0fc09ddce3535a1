"""A chain of step runs (``slimdit steps --config CHAIN``) ends where the same configs run one by one end, makes the
teacher's pairs once, continues rather than redoes, and refuses a bad link before the first link runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from slimdit.io import load_tensors, save_tensors


def _weights(student) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted((student / "transformer").glob("*.safetensors"))
            for k, v in load_tensors(f).items()}


def test_a_chain_ends_where_its_configs_run_alone_end_and_makes_the_pairs_once(tiny_flux_pipeline, tmp_path):
    from slimdit.cli import main
    from slimdit.config import load_config
    from slimdit.distill.fewstep import StepsConfig, run_steps

    common = {"teacher": str(tiny_flux_pipeline), "steps": 1, "pair_steps": 2, "data": {"real": "shapes-train:6"},
              "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0},
              "eval": {"benchmark": None, "bench": False}}
    first = {**common, "method": "reflow", "out": str(tmp_path / "alone" / "reflow")}
    second = {**common, "method": "direct", "student": str(tmp_path / "alone" / "reflow" / "student"),
              "out": str(tmp_path / "alone" / "direct")}
    cfgs = tmp_path / "configs"
    cfgs.mkdir()
    (cfgs / "reflow.yaml").write_text(yaml.safe_dump(first))
    (cfgs / "direct.yaml").write_text(yaml.safe_dump(second))
    chain = {"out": str(tmp_path / "chain"), "chain": [{"config": "reflow.yaml"}, {"config": "direct.yaml"}]}
    (cfgs / "chain.yaml").write_text(yaml.safe_dump(chain))

    assert main(["steps", "--config", str(cfgs / "chain.yaml")]) == 0
    links = tmp_path / "chain" / "links"
    assert sorted(p.name for p in links.iterdir()) == ["00_reflow", "01_direct"]
    assert not (tmp_path / "alone").exists()  # the configs' own outputs are not where the chain writes
    summary = json.loads((tmp_path / "chain" / "summary.json").read_text())
    assert summary["student"] == str(links / "01_direct" / "student")
    assert [r["method"] for r in summary["links"]] == ["reflow", "direct"]
    saved = yaml.safe_load((links / "01_direct" / "config.yaml").read_text())
    assert saved["student"] == str(links / "00_reflow" / "student")  # followed inside the chain
    a, b = (links / "00_reflow" / "pairs"), (links / "01_direct" / "pairs")
    assert os.path.samefile(a / "pairs_00000.safetensors", b / "pairs_00000.safetensors")  # made once
    assert json.loads((a / "pairs.json").read_text()) == json.loads((b / "pairs.json").read_text())

    for name in ("reflow", "direct"):  # the same two configs, one after the other
        run_steps(load_config(cfgs / f"{name}.yaml", StepsConfig), progress=False)
    alone, chained = _weights(tmp_path / "alone" / "direct" / "student"), _weights(links / "01_direct" / "student")
    assert alone.keys() == chained.keys() and all(torch.equal(alone[k], chained[k]) for k in alone)
    before = {k: v.clone() for k, v in _weights(links / "00_reflow" / "student").items()}
    assert not all(torch.equal(before[k], chained[k]) for k in before)  # the second link trained

    done = sorted(links.glob("*/rounds/*/done.json"))
    stamps = [f.stat().st_mtime_ns for f in done]
    assert main(["steps", "--config", str(cfgs / "chain.yaml")]) == 0  # a rerun finds both links done
    assert len(done) == 2 and [f.stat().st_mtime_ns for f in done] == stamps  # no round trained again
    assert all(torch.equal(v, _weights(links / "01_direct" / "student")[k]) for k, v in chained.items())


def test_a_bad_link_is_refused_before_the_first_link_runs(tiny_flux_pipeline, tmp_path):
    from slimdit.distill.chain import ChainConfig, run_chain

    common = {"teacher": str(tiny_flux_pipeline), "steps": 1, "data": {"real": "shapes-train:6"},
              "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0},
              "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**common, "method": "reflow", "out": "runs/a"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**common, "method": "ladd", "out": "runs/b",
                                                     "student": str(tmp_path / "runs" / "elsewhere" / "student")}))
    chain = ChainConfig(out=str(tmp_path / "chain"), chain=[{"config": "a.yaml"}, {"config": "b.yaml"}])
    with pytest.raises(ValueError, match=r"chain link 1 \(b.yaml\): student .*elsewhere/student does not exist and "
                                         r"no earlier link makes it"):
        run_chain(chain, base=tmp_path, progress=False)
    bad = ChainConfig(out=str(tmp_path / "chain"), chain=[{"config": "a.yaml"},
                                                          {"config": "a.yaml", "set": {"train.steps": 0}}])
    with pytest.raises(ValueError, match=r"(?s)chain link 1 \(a.yaml\): .*train.steps"):
        run_chain(bad, base=tmp_path, progress=False)
    with pytest.raises(ValueError, match="chain link 0: config missing.yaml does not exist"):
        run_chain(ChainConfig(out=str(tmp_path / "chain"), chain=[{"config": "missing.yaml"}]), base=tmp_path)
    assert not (tmp_path / "chain").exists()  # nothing written before every link was checked


def test_pairs_are_reused_only_from_a_run_that_made_them_the_same_way(tmp_path):
    from slimdit.distill.reflow import reuse_pairs
    from slimdit.io import write_json

    record = {"made_by": {"teacher": "t"}, "guidance": 3.5, "t": [1.0], "s": [0.0], "seed": 0, "rows": 2}
    other, same = tmp_path / "other" / "pairs", tmp_path / "same" / "pairs"
    for folder, rec in ((other, {**record, "guidance": 1.0}), (same, record)):
        folder.mkdir(parents=True)
        write_json(folder / "pairs.json", rec)
        save_tensors(folder / "pairs_00000.safetensors", {"noise": torch.zeros(2, 1), "x0": torch.ones(2, 1)})
    out = tmp_path / "run" / "pairs"
    assert reuse_pairs(out, record, [other]) is None and not out.exists()  # made at another guidance: not reused
    assert reuse_pairs(out, record, [tmp_path / "none", other, same]) == same
    assert os.path.samefile(out / "pairs_00000.safetensors", same / "pairs_00000.safetensors")
    assert reuse_pairs(out, record, [same]) is None  # a run with shards of its own keeps them

    from slimdit.distill.fewstep import StepsConfig

    with pytest.raises(ValueError, match="pairs_from reuses the teacher's pairs, which method: ladd does not"):
        StepsConfig(out="x", method="ladd", pairs_from=["runs/a"])


def test_a_chain_follows_each_spelling_of_an_earlier_links_output_and_keeps_a_links_own_pairs_from(tmp_path):
    """The rewrites the shipped chains rely on, without running a link: a teacher named by an earlier link's output
    (more halvings), an ``out`` given in a link's ``set``, a path spelt another way, a ``#transformer=`` part; a
    link's own ``pairs_from`` kept after the earlier links'; a link that has work from another config refused."""
    from slimdit.config import dump_config, load_config
    from slimdit.distill.chain import ChainConfig, link_configs, run_chain
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.pipelines.loading import TRANSFORMER_SEP

    def write(name, **fields):
        (tmp_path / name).write_text(yaml.safe_dump({"teacher": "shapes-flux", "steps": 1, **fields}))

    write("a.yaml", method="reflow", out="runs/a", train={"caption_dropout": 0.0})
    write("b.yaml", method="progressive", start=4, teacher="runs/a/student", out="runs/b")
    write("c.yaml", method="ladd", student="./runs/x/../b/student", out="runs/c")
    write("d.yaml", method="direct", student=f"shapes-flux{TRANSFORMER_SEP}runs/c-renamed/student/transformer",
          out="runs/d", pairs_from=["runs/elsewhere"], train={"caption_dropout": 0.0})
    chain = ChainConfig(out=str(tmp_path / "chain"), chain=[
        {"config": "a.yaml"}, {"config": "b.yaml"}, {"config": "c.yaml", "set": {"out": "runs/c-renamed"}},
        {"config": "d.yaml"}])
    links = dict(link_configs(chain, tmp_path))
    at = {k: str(tmp_path / "chain" / "links" / k) for k in links}
    assert links["01_b"].teacher == f"{at['00_a']}/student"
    assert links["02_c"].student == f"{at['01_b']}/student" and links["02_c"].out == at["02_c"]
    assert links["03_d"].student == f"shapes-flux{TRANSFORMER_SEP}{at['02_c']}/student/transformer"
    assert links["03_d"].pairs_from == [at["00_a"], at["01_b"], at["02_c"], "runs/elsewhere"]
    assert links["00_a"].pairs_from == [] and links["02_c"].pairs_from == []  # the first link has none before it

    started = tmp_path / "chain" / "links" / "00_a"  # work made with another config
    started.mkdir(parents=True)
    dump_config(load_config(tmp_path / "a.yaml", StepsConfig, overrides={"steps": 2, "out": str(started)}),
                started / "config.yaml")
    (started / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"(?s)chain link 00_a: .* another config.*steps: 2 -> 1"):
        run_chain(chain, base=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "chain" / "links").iterdir()) == ["00_a"]  # nothing else started


def test_a_link_reads_a_model_as_local_exactly_where_the_loader_does_not_take_a_hub_id(tmp_path, monkeypatch):
    """The chain follows or checks a model part as a local path by the loader's own rule (``is_hub_id``): a path
    under an existing folder, or written as a path, is local; ``owner/name`` with no such folder, and a registered
    name, are not."""
    from slimdit.distill.chain import _local
    from slimdit.pipelines.loading import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for hub in ("org/name", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"):
        assert is_hub_id(hub) and not _local(hub)
    for path in ("runs/studnt", "./org/name", "../x/y", "/abs/x", "~/x/y", "a/b/c"):
        assert not is_hub_id(path) and _local(path), path
    assert not _local("shapes-pixart") and not is_hub_id("shapes-pixart")
