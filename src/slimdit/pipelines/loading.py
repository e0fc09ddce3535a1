"""Resolve a MODEL argument: a built-in name, a local diffusers directory, or a hub id, optionally with its
transformer taken from elsewhere (a transformer-only repo or directory over a base pipeline).

A model whose transformer comes from elsewhere is written ``PIPELINE#transformer=TRANSFORMER`` (what
``--transformer`` beside ``--model`` and ``teacher: {pipeline: ..., transformer: ...}`` in a config make), so
that one string names it everywhere: run identity, caches and sampling defaults.

A student is saved as its transformer alone (``transformer/``) beside ``slimdit_base.json``, which names the pipeline
it runs in (its teacher's); such a directory reads as ``BASE#transformer=DIR/transformer`` everywhere. ``slimdit
export --full`` writes a standalone pipeline from it.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch

from slimdit.identity import HUB_COMMIT, recorded_commit, same_value
from slimdit.io import files_fingerprint, write_json
from slimdit.models.storage import LOWRANK_INDEX, check_finite, drop_origin, load_model, save_model
from slimdit.pipelines.sampling import PipelineSampler, Sampler, SamplingOptions
from slimdit.registry import COMPONENTS, MODELS, SAMPLERS

TRANSFORMER_SEP = "#transformer="
BASE_FILE = "slimdit_base.json"  # in a student directory: the pipeline its transformer runs in


def join_model(pipeline: str, transformer: str | None) -> str:
    """The MODEL string of ``pipeline`` with its transformer taken from ``transformer`` (a directory holding
    ``config.json`` or ``transformer/config.json``, or a hub id); ``pipeline`` itself without one."""
    if not transformer:
        return pipeline
    if TRANSFORMER_SEP in pipeline:
        raise ValueError(f"{pipeline!r} already names its transformer; give --transformer once")
    return f"{pipeline}{TRANSFORMER_SEP}{transformer}"


def student_base(model: str) -> str | None:
    """The base pipeline a student directory names in ``slimdit_base.json``, else None."""
    p = Path(model)
    if TRANSFORMER_SEP in model or not (p / BASE_FILE).is_file() or (p / "model_index.json").exists():
        return None
    return json.loads((p / BASE_FILE).read_text())["base"]


def split_model(model: str) -> tuple[str, str | None]:
    """``(pipeline, transformer or None)`` of a MODEL string (:func:`join_model`) or a student directory."""
    base = student_base(model)
    if base is not None:
        return base, str(Path(model) / "transformer")
    pipeline, sep, transformer = model.partition(TRANSFORMER_SEP)
    return pipeline, (transformer if sep else None)


def resolve_model_dir(model: str) -> Path | str:
    """Return a local pipeline directory for a built-in or local model, or the hub id unchanged. A missing path whose
    first component is a local directory (``runs/studnt`` where ``runs/`` exists) is a mistyped directory, not a hub
    id: the error names the first missing component and suggests close names beside it."""
    from difflib import get_close_matches

    base = student_base(model)
    if base is not None:
        try:
            resolve_model_dir(base)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"student {model} runs in the base pipeline {base!r} that its {BASE_FILE} names, "
                                    f"which cannot be found ({e}); restore it there, or point {BASE_FILE} at a copy"
                                    ) from e
    model, transformer = split_model(model)
    if transformer is not None:
        resolve_transformer(transformer)
    if model in MODELS:
        return MODELS[model]()
    if model in SAMPLERS:
        raise ValueError(f"{model!r} is a renderer without a transformer: it can be evaluated (slimdit eval) and "
                         f"used as a reference, not analyzed, searched, compressed or trained; give a pipeline "
                         f"({', '.join(MODELS)}, a directory or a hub id)")
    if model.startswith("arch:"):
        raise ValueError(f"{model!r} is a random-weight model at real dimensions, for 'slimdit bench' and memory "
                         "plans (--dry-run) only; give a built-in name, a pipeline directory or a hub id")
    p = Path(model)
    if p.exists():
        if not (p / "model_index.json").exists():
            if _transformer_config(p) is not None:
                raise FileNotFoundError(f"{p} holds only a transformer, not a pipeline: give a base pipeline as "
                                        f"the model and this directory as its transformer (--transformer {p}, "
                                        "or teacher: {pipeline: ..., transformer: ...} in a config)")
            raise FileNotFoundError(f"{p} is not a diffusers pipeline directory (no model_index.json)")
        _check_components(p)
        return p
    if is_hub_id(model):
        if not _cached_hub_model(model) and _cached_hub_transformer(model):
            raise FileNotFoundError(f"hub repo {model} holds only a transformer, not a pipeline: give a base "
                                    f"pipeline as the model and this repo as its transformer (--transformer {model})")
        return model  # a hub id; diffusers resolves it from the cache or the hub
    if len(p.parts) > 1 and Path(p.parts[0]).is_dir():
        base = next(q for q in p.parents if q.is_dir())  # the deepest existing directory, at least p.parts[0]
        missing = p.parts[len(base.parts)]
        close = get_close_matches(missing, sorted(c.name for c in base.iterdir() if c.is_dir()), n=3)
        hint = f"; did you mean {' or '.join(str(base / c) for c in close)}?" if close else ""
        raise FileNotFoundError(f"model directory {p} does not exist: {base}/ has no {missing!r} (a path under "
                                f"a local directory is not taken for a hub id){hint}")
    raise FileNotFoundError(f"unknown model {model!r}: not a built-in ({', '.join(MODELS)}), "
                            "not an existing directory, not a hub id (owner/name)")


def _transformer_config(p: Path) -> Path | None:
    """The ``config.json`` of a transformer stored in directory ``p`` (at its top or under ``transformer/``)."""
    for c in (p / "config.json", p / "transformer" / "config.json"):
        if c.exists() and json.loads(c.read_text()).get("_class_name"):
            return c
    return None


def resolve_transformer(transformer: str) -> Path | str:
    """A transformer's directory (holding its ``config.json``), or a hub id unchanged."""
    p = Path(transformer)
    if p.exists():
        c = _transformer_config(p)
        if c is None:
            raise FileNotFoundError(f"transformer {p} has no config.json (nor transformer/config.json) naming a "
                                    "diffusers model class")
        return c.parent
    if _hub_shaped(transformer):
        return transformer
    raise FileNotFoundError(f"transformer {transformer!r}: not an existing directory and not a hub id (owner/name)")


def _check_components(p: Path) -> None:
    """Refuse a pipeline directory that lacks a component its ``model_index.json`` names, naming it."""
    index = json.loads((p / "model_index.json").read_text())
    missing = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
               and not (p / k).is_dir()]
    if missing:
        raise FileNotFoundError(f"pipeline {p} lacks component(s) {', '.join(missing)} that its model_index.json "
                                "names (an incomplete download or copy?)")


def _load_transformer(transformer: str, dtype: torch.dtype | None):
    """Load a transformer from a directory or hub id, by the class its ``config.json`` names."""
    import diffusers

    src = resolve_transformer(transformer)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if isinstance(src, Path):
        if (src / LOWRANK_INDEX).exists():
            return load_model(src, dtype=dtype)
        cls = json.loads((src / "config.json").read_text())["_class_name"]
        return getattr(diffusers, cls).from_pretrained(src, **kwargs)
    from huggingface_hub import hf_hub_download

    sub = None
    if (rev := hub_revision(src)) is not None:
        kwargs["revision"] = rev  # the cached commit its fingerprint names
    try:
        config = hf_hub_download(src, "config.json", revision=rev)
    except Exception:  # a pipeline-style repo keeps it under transformer/
        sub = "transformer"
        try:
            config = hf_hub_download(src, "config.json", subfolder=sub, revision=rev)
        except Exception as e:
            raise FileNotFoundError(f"could not find transformer {src!r}'s config.json (at its top or under "
                                    f"transformer/) locally or on the hub: {e}") from e
    cls = json.loads(Path(config).read_text())["_class_name"]
    return getattr(diffusers, cls).from_pretrained(src, subfolder=sub, **kwargs)


def load_transformer(model: str, dtype: torch.dtype | None = None):
    """The transformer of MODEL (a built-in name, pipeline directory, student directory or ``BASE::TRANSFORMER``
    string), loaded without the rest of its pipeline."""
    pipeline, transformer = split_model(model)
    return _load_transformer(transformer or str(resolve_model_dir(pipeline)), dtype)


def same_base(a: str, b: str) -> bool:
    """Whether MODELs ``a`` and ``b`` run in the same base pipeline (text encoders, VAE): a student in its base's."""
    def base(m):
        src = resolve_model_dir(split_model(m)[0])
        return src.resolve() if isinstance(src, Path) else src

    return base(a) == base(b)


def is_hub_id(model: str) -> bool:
    """Whether a model string that is no registered name and no existing directory is read as a hub id
    (``owner/name``) rather than a local path: one slash, not written as a path (``./``, ``/``, ``~``), and its owner
    not a local directory (``runs/studnt`` where ``runs/`` exists is a mistyped directory), unless the hub cache
    holds that id."""
    if not _hub_shaped(model):
        return False
    return not Path(model.split("/")[0]).is_dir() or _cached_hub_model(model)


def _hub_shaped(name: str) -> bool:
    """Whether ``name`` is written as a hub id: the hub's characters, one slash, no path prefix."""
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) is not None


def _cached_hub_model(model: str) -> bool:
    """Whether ``model`` is a hub id whose pipeline is in the local Hugging Face cache."""
    if not _hub_shaped(model):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _cached_hub_transformer(model: str) -> bool:
    """Whether ``model`` is a hub id whose cached files hold a transformer's config (a transformer-only repo)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(model, f), str)
                   for f in ("config.json", "transformer/config.json"))
    except ValueError:
        return False


def _snapshots(repo: str) -> Path:
    """Where the local Hugging Face cache keeps hub repo ``repo``'s commits, one folder each."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots"


def hub_revision(repo: str) -> str | None:
    """The commit that the local Hugging Face cache resolves hub repo ``repo``'s ``main`` to, or None when none of
    its files is cached there. :func:`load_pipeline` loads that commit, so it is what a run's fingerprint names."""
    from huggingface_hub import try_to_load_from_cache

    snapshots = _snapshots(repo)
    for f in ("model_index.json", "config.json", "transformer/config.json"):
        try:
            path = try_to_load_from_cache(repo, f)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(path, str):
            try:
                commit = Path(path).relative_to(snapshots).parts[0]
            except ValueError:  # a cache laid out otherwise
                return None
            return commit if HUB_COMMIT.fullmatch(commit) else None
    return None


def _hub_fingerprint(repo: str) -> str:
    """``repo@commit`` for a cached hub repo, so that a new revision pulled under the same id is seen; the bare id
    while nothing is cached (a record holding it is taken as matching any revision:
    :func:`slimdit.identity.same_value`)."""
    rev = hub_revision(repo)
    return repo if rev is None else f"{repo}@{rev}"


def model_fingerprint(model: str) -> str:
    """A short digest of a model's files, for caches and runs that are keyed by a model name: a built-in retrained
    under the same name, or a directory overwritten in place, gets a new fingerprint
    (:func:`slimdit.io.files_fingerprint`). A hub id is named with its cached revision (:func:`_hub_fingerprint`)."""
    if model in SAMPLERS:
        return model
    pipeline, transformer = split_model(model)
    src = resolve_model_dir(pipeline)
    fp = files_fingerprint(src) if isinstance(src, Path) else _hub_fingerprint(src)
    if transformer is not None:
        t = resolve_transformer(transformer)
        fp += "+" + (files_fingerprint(t) if isinstance(t, Path) else _hub_fingerprint(t))
    return fp


def load_pipeline(model: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline for ``model`` (built-in name, directory or hub id)."""
    from diffusers import DiffusionPipeline

    for module in COMPONENTS.values():  # a world's pipeline components (a custom VAE): diffusers finds a class
        importlib.import_module(module)  # only once its module is imported
    src = resolve_model_dir(model)
    _, transformer = split_model(model)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if transformer is not None:
        kwargs["transformer"] = _load_transformer(transformer, dtype)
    elif isinstance(src, Path) and (src / "transformer" / LOWRANK_INDEX).exists():
        kwargs["transformer"] = load_model(src / "transformer", dtype=dtype)  # a low-rank student
    base = student_base(model)
    recorded = json.loads((Path(model) / BASE_FILE).read_text()).get("base_fingerprint") if base else None
    pinned = _recorded_revision(src, recorded) if isinstance(src, str) else None  # the base a student was made with
    if isinstance(src, str) and (rev := pinned or hub_revision(src)) is not None:
        kwargs["revision"] = rev  # the cached commit its fingerprint names, not a newer one pulled on the way
    try:
        pipe = DiffusionPipeline.from_pretrained(src, **kwargs)
    except OSError as e:
        hint = ""
        if isinstance(src, str) and "model_index.json" in str(e):
            hint = (" (a hub repo that holds only a transformer, like PixArt-alpha/PixArt-Sigma-XL-2-512-MS, needs "
                    "a base pipeline: --model BASE --transformer REPO)")
        raise FileNotFoundError(f"could not load model {model!r}: {e}{hint}") from e
    if base is not None and pinned is None:
        now = model_fingerprint(base) if recorded is not None else None  # hashes the base's files once
        if not same_value(recorded, now):
            import warnings

            warnings.warn(f"the base pipeline {base!r} of student {model} has changed since the student was saved "
                          f"(fingerprint {recorded} -> {now}): its text encoders or VAE may not be the ones the "
                          "student was trained with", stacklevel=2)
    if base is not None and (Path(model) / "scheduler").is_dir():  # a few-step student's sampler
        import diffusers

        cfg = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
        pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_pretrained(Path(model) / "scheduler")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _recorded_revision(repo: str, fingerprint: str | None) -> str | None:
    """The commit of hub repo ``repo`` that a student's recorded base fingerprint names, when the local cache still
    holds it: the student then loads the base it was trained with, though ``main`` has moved on since."""
    commit = recorded_commit(fingerprint, repo)
    return commit if commit and (_snapshots(repo) / commit / "model_index.json").exists() else None


def _pipeline_class(model: str) -> str | None:
    """The pipeline class a model directory (or a cached hub model) names in ``model_index.json``."""
    src = resolve_model_dir(model)
    index = src / "model_index.json" if isinstance(src, Path) else None
    if index is None and _cached_hub_model(src):
        from huggingface_hub import try_to_load_from_cache

        index = Path(try_to_load_from_cache(src, "model_index.json"))
    return json.loads(index.read_text()).get("_class_name") if index is not None and index.exists() else None


def sampling_defaults(model: str) -> dict:
    """How ``model`` samples by default: what its directory records in ``slimdit.json``, else its architecture's
    published defaults, from the adapter of its pipeline class (PixArt-Sigma: thesis table 4.3; Flux-dev: 4.4)."""
    from slimdit.models import ADAPTERS

    src = resolve_model_dir(model)
    if student_base(model) is not None:  # a student records its own (a few-step student's differ)
        src = Path(model)
    recorded = {}
    if isinstance(src, Path) and (src / "slimdit.json").exists():
        recorded = json.loads((src / "slimdit.json").read_text()).get("sampling", {})
    cls = _pipeline_class(model)
    for adapter in ADAPTERS.values():
        if cls in adapter.pipelines:
            return {**adapter.sampling, **recorded}  # what the directory records, over its architecture's
    if {"num_inference_steps", "guidance_scale", "max_sequence_length"} <= set(recorded):
        return recorded
    raise ValueError(f"no sampling defaults for {model!r}: its pipeline class {cls!r} has no slimdit adapter "
                     f"(supported: {', '.join(p for a in ADAPTERS.values() for p in a.pipelines)}) and it records "
                     "none in slimdit.json")


def sampling_options(defaults: dict, steps: int | None = None, batch_size: int = 64) -> SamplingOptions:
    """Sampling options from a model's ``defaults`` (:func:`sampling_defaults`), ``steps`` overridden where given; what
    the defaults hold beyond steps, guidance and prompt length (e.g. ``height``) is passed to the pipeline as is. A
    guidance override goes through the adapter first (:func:`pipeline_sampler`): how a model guides is its own."""
    known = {"num_inference_steps", "guidance_scale", "max_sequence_length"}
    return SamplingOptions(num_inference_steps=steps or defaults["num_inference_steps"],
                           guidance_scale=defaults["guidance_scale"],
                           max_sequence_length=defaults["max_sequence_length"], batch_size=batch_size,
                           extra={k: v for k, v in defaults.items() if k not in known})


def load_sampler(model: str, steps: int | None = None, guidance: float | None = None, batch_size: int = 64,
                 device: str | None = None) -> Sampler:
    """Build the sampler for ``model`` with its recorded defaults, overridden by ``steps`` / ``guidance``."""
    if model in SAMPLERS:
        return SAMPLERS[model]()
    return pipeline_sampler(load_pipeline(model, device), model, steps, guidance, batch_size)


def pipeline_sampler(pipe, model: str, steps: int | None = None, guidance: float | None = None,
                     batch_size: int = 64, name: str | None = None) -> PipelineSampler:
    """A sampler over an already loaded ``pipe`` with ``model``'s recorded sampling defaults, overridden by
    ``steps`` / ``guidance``. The pipe's transformer may be swapped for a student's between calls."""
    from slimdit.models import adapter_for

    defaults = sampling_defaults(model)
    if guidance is not None:  # through the adapter: a true-CFG Flux base guides with true_cfg_scale, not guidance
        defaults = {**defaults, **adapter_for(pipe.transformer).guided_sampling(pipe.transformer, guidance)}
    return PipelineSampler(pipe, sampling_options(defaults, steps, batch_size), name=name or model)


def save_student(transformer, out_dir: str | Path, base: str, scheduler=None, sampling: dict | None = None) -> Path:
    """Save a student as ``transformer/`` (dense or low-rank) beside ``slimdit_base.json`` naming the pipeline it
    runs in (``base``'s pipeline: a registered name, a hub id, or a directory by its absolute path), and its sampling
    defaults (``slimdit.json``: ``base``'s, updated with ``sampling``). A few-step student also saves the
    ``scheduler`` it samples with, which replaces the base's. A whole pipeline an earlier save left in ``out_dir`` is
    taken out first, so the folder reads as the student."""
    import shutil

    out = Path(out_dir)
    check_finite(transformer, str(out))
    pipeline, _ = split_model(base)  # a student of a student runs in the same base
    ref = pipeline if pipeline in MODELS or not Path(pipeline).exists() else str(Path(pipeline).resolve())
    if ref == str(out.resolve()):
        raise ValueError(f"cannot save a student into {out}: that folder is its own base pipeline; give another")
    if (out / "model_index.json").exists():
        index = json.loads((out / "model_index.json").read_text())
        for k in index:
            if not k.startswith("_") and (out / k).is_dir():
                shutil.rmtree(out / k)
        (out / "model_index.json").unlink()
    for sub in ("transformer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    save_model(transformer, out / "transformer")
    if scheduler is not None:
        scheduler.save_pretrained(out / "scheduler")
    src = Path(base) if student_base(base) is not None else resolve_model_dir(pipeline)
    record = json.loads((src / "slimdit.json").read_text()) if isinstance(src, Path) and (
        src / "slimdit.json").exists() else {}
    if sampling:
        record["sampling"] = {**record.get("sampling", {}), **sampling}
    if record:
        write_json(out / "slimdit.json", record)
    write_json(out / BASE_FILE, {"base": ref, "base_fingerprint": model_fingerprint(pipeline)})
    return out


def save_pipeline_with(pipe, transformer, out_dir: str | Path, source: str | None = None) -> Path:
    """Save ``pipe`` with ``transformer`` in place of its own (dense or low-rank), plus the source's sampling
    defaults (``slimdit.json``)."""
    import shutil

    out = Path(out_dir)
    check_finite(transformer, str(out))  # before the pipeline writes its copy of the transformer
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.transformer = original
    shutil.rmtree(out / "transformer")
    save_model(transformer, out / "transformer")
    for config in (out / "model_index.json", *out.glob("*/config.json")):
        drop_origin(config)  # where each part was loaded from: the same pipeline saved again is the same files
    if source is not None:
        src = Path(source) if student_base(source) is not None else resolve_model_dir(source)
        if isinstance(src, Path) and (src / "slimdit.json").exists():
            shutil.copy(src / "slimdit.json", out / "slimdit.json")
    return out
