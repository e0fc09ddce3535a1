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

from pathlib import Path
from typing import Any

from pydantic import Field

from slimdit.config import _Strict, load_config, read_config_file
from slimdit.distill.fewstep import StepsConfig
from slimdit.io import read_json, write_json
from slimdit.pipelines.loading import TRANSFORMER_SEP

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
    own, links = {}, []  # an earlier link's own student path -> the chain's copy of it
    for i, link in enumerate(cfg.chain):
        path = Path(link.config) if Path(link.config).is_absolute() else Path(base) / link.config
        if not path.exists():
            raise ValueError(f"chain link {i}: config {link.config} does not exist (looked for {path})")
        name = f"{i:02d}_{path.stem}"
        out = str(Path(cfg.out) / "links" / name)
        try:
            alone = load_config(path, StepsConfig, overrides=link.set)
        except ValueError as e:
            raise ValueError(f"chain link {i} ({link.config}): {e}") from None
        sets = {**link.set, "out": out}
        for field in MODEL_FIELDS:
            value = getattr(alone, field)
            if value is not None and _norm(value) in own:
                sets[field] = own[_norm(value)]
            elif value is not None and _missing_path(value):
                raise ValueError(f"chain link {i} ({link.config}): {field} {value} does not exist and no earlier link "
                                 f"makes it (earlier links make: {', '.join(own) or 'nothing'})")
        if alone.method in ("reflow", "direct") or alone.regression_weight:
            sets["pairs_from"] = [o for _, c in links for o in [c.out]]
        links.append((name, load_config(path, StepsConfig, overrides=sets)))
        own[_norm(str(Path(alone.out) / "student"))] = str(Path(out) / "student")
    return links


def _norm(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if TRANSFORMER_SEP not in path else path


def _missing_path(value: str) -> bool:
    """A model string that is written as a local path (two or more parts, or ./ or /) and is not there; a hub id
    (``org/name``) or a registered name is left to the loader."""
    p = Path(value.split(TRANSFORMER_SEP)[0])
    looks_local = value.startswith(("/", "./", "../")) or len(p.parts) > 2
    return looks_local and not p.exists()


def run_chain(config: str | Path | dict | ChainConfig, base: str | Path = ".", progress: bool = True) -> Path:
    """Run (or continue) every link in turn; return the chain's directory."""
    from slimdit.distill.fewstep import run_steps
    from slimdit.io import ensure_writable
    from slimdit.processes import process_state

    cfg = config if isinstance(config, ChainConfig) else load_config(config, ChainConfig)
    if isinstance(config, (str, Path)):
        base = Path(config).parent
    links = link_configs(cfg, base)  # every link checked before the first starts
    out = Path(cfg.out)
    ensure_writable(out, "chain out")
    if process_state().is_main_process:
        write_json(out / "chain.json", {"chain": [link.model_dump() for link in cfg.chain],
                                        "links": [name for name, _ in links]})
    for name, link in links:
        if progress and process_state().is_main_process:
            print(f"chain: {name} ({link.method}, {link.steps} steps)", flush=True)
        run_steps(link, progress=progress)
    if not process_state().is_main_process:
        return out
    rows = []
    for name, link in links:
        s = read_json(Path(link.out) / "summary.json")
        rows.append({"link": name, "out": link.out, "method": s["method"], "steps": s["steps"],
                     "seconds": round(sum(r.get("seconds", 0) for r in s["rounds"]), 1),
                     **{k: s[k] for k in ("student_metrics", "retained_overall", "bench") if k in s}})
    write_json(out / "summary.json", {"student": str(Path(links[-1][1].out) / "student"), "links": rows})
    return out
