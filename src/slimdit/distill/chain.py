"""``slimdit steps --config CHAIN``: step-distillation runs in turn, each from what an earlier one made.

A recipe such as the one-step chain of ``docs/steps.md`` is several ``slimdit steps`` configs, each naming the
previous run's student (or, for more halvings, its teacher). A chain file lists them::

    out: runs/steps-flux-one-step
    chain:
      - config: flux-reflow4.yaml          # a steps config, relative to the chain file's folder
      - config: flux-pd4-ladd.yaml
        set: {steps: 1, student: runs/steps-flux-dmd1-1/student, out: runs/steps-flux-dmd1-ladd}

Each link runs as ``slimdit steps`` would run its config with its ``set`` applied, in ``OUT/links/NN_NAME``. A
link's ``teacher`` or ``student`` that names an earlier link's own output (its config's ``out`` + ``/student``) is
read from that link in the chain instead, so the configs keep working alone. A link that trains on the teacher's
pairs reuses an earlier link's (``pairs_from``) when they were made the same way. Every link is checked before the
first one starts: a bad field or a model that neither exists nor comes from an earlier link is refused up front, not
hours in. A link is a resumable run, so rerunning the chain continues where it stopped; ``summary.json`` lists the
links and names the final student.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from slimdit.config import _Strict, load_config, read_config_file, resolve_inputs
from slimdit.distill.fewstep import StepsConfig
from slimdit.io import read_json, write_json
from slimdit.pipelines.loading import TRANSFORMER_SEP, is_hub_id
from slimdit.registry import MODELS

MODEL_FIELDS = ("teacher", "student")


class ChainLink(_Strict):
    config: str  # a steps config file, relative to the chain file's folder (or absolute)
    set: dict[str, Any] = {}  # dotted overrides, as ``--set`` takes them


class ChainConfig(_Strict):
    out: str
    chain: list[ChainLink] = Field(min_length=1)


def is_chain(path: str | Path) -> bool:
    """Whether a config file is a chain (it has a ``chain:`` list) rather than one steps run."""
    return "chain" in read_config_file(path)


def link_configs(cfg: ChainConfig, base: str | Path) -> list[tuple[str, StepsConfig]]:
    """Each link's name and its config as it will run, checked; ``base`` is the chain file's folder."""
    own, links = {}, []  # an earlier link's own student folder -> the chain's copy of it
    for i, link in enumerate(cfg.chain):
        path = Path(link.config) if Path(link.config).is_absolute() else Path(base) / link.config
        if not path.exists():
            raise ValueError(f"chain link {i}: config {link.config} does not exist (looked for {path})")
        name = f"{i:02d}_{path.stem}"
        out = str(Path(cfg.out) / "links" / name)
        sets = resolve_inputs(dict(link.set), base, dotted=True)  # as --set paths: the chain file's folder first
        try:
            alone = load_config(path, StepsConfig, overrides=sets)
        except ValueError as e:
            raise ValueError(f"chain link {i} ({link.config}): {e}") from None
        sets["out"] = out
        for field in MODEL_FIELDS:
            value = getattr(alone, field)
            if value is None:
                continue
            moved = _follow(value, own)
            if moved != value:
                sets[field] = moved
            elif missing := _missing_part(value):
                raise ValueError(f"chain link {i} ({link.config}): {field} {value}: {missing} does not exist and no "
                                 f"earlier link makes it (earlier links make: {', '.join(own) or 'nothing'})")
        if alone.trains_on_pairs:  # the earlier links' pairs first, then the config's own
            sets["pairs_from"] = [*(c.out for _, c in links), *alone.pairs_from]
        links.append((name, load_config(path, StepsConfig, overrides=sets)))
        own[_norm(str(Path(alone.out) / "student"))] = str(Path(out) / "student")
    return links


def _norm(path: str) -> str:
    """A local path made absolute with ``..`` collapsed, so two spellings of one folder compare equal."""
    return os.path.abspath(os.path.expanduser(path))


def _follow(model: str, own: dict[str, str]) -> str:
    """``model`` with each local part that names an earlier link's own student (or its ``transformer/``) moved to
    the chain's copy of it; the pipeline and transformer parts of a ``#transformer=`` string separately."""
    parts = model.split(TRANSFORMER_SEP)
    for k, part in enumerate(parts):
        if not _local(part):
            continue
        p = _norm(part)
        if p in own:
            parts[k] = own[p]
        elif os.path.basename(p) == "transformer" and os.path.dirname(p) in own:
            parts[k] = str(Path(own[os.path.dirname(p)]) / "transformer")
    return TRANSFORMER_SEP.join(parts)


def _local(part: str) -> bool:
    """Whether a model string's part is written as a local path: one with a folder in it that the loader does not
    read as a hub id (:func:`~slimdit.pipelines.loading.is_hub_id`). A registered name is not."""
    return part not in MODELS and ("/" in part or part.startswith("~")) and not is_hub_id(part)


def _missing_part(model: str) -> str | None:
    """The first local part of ``model`` that does not exist (None: all there, or left to the loader)."""
    return next((p for p in model.split(TRANSFORMER_SEP) if _local(p) and not Path(p).expanduser().exists()), None)


def check_links(links: list[tuple[str, StepsConfig]]) -> None:
    """Refuse, before any link runs, a link whose run directory holds work made with another config (its inputs are
    checked when it starts, once the links before it have made them)."""
    from slimdit.identity import config_changes, started

    for name, link in links:
        if started(link.out) and (changes := config_changes(link.out, link)):
            raise ValueError(f"chain link {name}: {link.out} holds work made with another config; restore it or "
                             "choose another chain out:\n  " + "\n  ".join(changes))


def run_chain(config: str | Path | dict | ChainConfig, base: str | Path = ".", progress: bool = True) -> Path:
    """Run (or continue) every link in turn; return the chain's directory."""
    from slimdit.distill.fewstep import run_steps
    from slimdit.io import ensure_writable
    from slimdit.processes import process_state

    cfg = config if isinstance(config, ChainConfig) else load_config(config, ChainConfig)
    if isinstance(config, (str, Path)):
        base = Path(config).parent
    links = link_configs(cfg, base)  # every link checked before the first starts
    check_links(links)
    out, state = Path(cfg.out), process_state()
    ensure_writable(out, "chain out")
    if state.is_main_process:
        write_json(out / "chain.json", {"chain": [link.model_dump() for link in cfg.chain],
                                        "links": [name for name, _ in links]})
    for name, link in links:
        if progress and state.is_main_process:
            print(f"chain: {name} ({link.method}, {link.steps} steps)", flush=True)
        run_steps(link, progress=progress)
        state.wait_for_everyone()  # the main process saves the link's student last: the next link reads it
    if not state.is_main_process:
        return out
    rows = []
    for name, link in links:
        s = read_json(Path(link.out) / "summary.json")
        rows.append({"link": name, "out": link.out, "method": s["method"], "steps": s["steps"],
                     "seconds": round(sum(r.get("seconds", 0) for r in s["rounds"]), 1),
                     **{k: s[k] for k in ("student_metrics", "retained_overall", "bench") if k in s}})
    write_json(out / "summary.json", {"student": str(Path(links[-1][1].out) / "student"), "links": rows})
    return out
