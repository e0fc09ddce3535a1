"""Resolve a MODEL argument: a built-in name, a local diffusers directory, or a hub id."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from slimdit.io import files_fingerprint
from slimdit.models.storage import LOWRANK_INDEX, check_finite, load_model, save_model
from slimdit.pipelines.sampling import PipelineSampler, Sampler, SamplingOptions
from slimdit.registry import COMPONENTS, MODELS, SAMPLERS


def resolve_model_dir(model: str) -> Path | str:
    """Return a local pipeline directory for a built-in or local model, or the hub id unchanged. A missing path whose
    first component is a local directory (``runs/studnt`` where ``runs/`` exists) is a mistyped directory, not a hub
    id: the error names the first missing component and suggests close names beside it."""
    from difflib import get_close_matches

    if model in MODELS:
        return MODELS[model]()
    p = Path(model)
    if p.exists():
        if not (p / "model_index.json").exists():
            raise FileNotFoundError(f"{p} is not a diffusers pipeline directory (no model_index.json)")
        return p
    if len(p.parts) > 1 and Path(p.parts[0]).is_dir() and not _cached_hub_model(model):
        base = next(q for q in p.parents if q.is_dir())  # the deepest existing directory, at least p.parts[0]
        missing = p.parts[len(base.parts)]
        close = get_close_matches(missing, sorted(c.name for c in base.iterdir() if c.is_dir()), n=3)
        hint = f"; did you mean {' or '.join(str(base / c) for c in close)}?" if close else ""
        raise FileNotFoundError(f"model directory {p} does not exist: {base}/ has no {missing!r} (a path under "
                                f"a local directory is not taken for a hub id){hint}")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id; diffusers resolves it from the cache or the hub
    raise FileNotFoundError(f"unknown model {model!r}: not a built-in ({', '.join([*MODELS, *SAMPLERS])}), "
                            "not an existing directory, not a hub id (owner/name)")


def _cached_hub_model(model: str) -> bool:
    """Whether ``model`` is a hub id whose pipeline is in the local Hugging Face cache."""
    if model.count("/") != 1 or model.startswith((".", "/")):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def model_fingerprint(model: str) -> str:
    """A short digest of a model's files, for caches and runs that are keyed by a model name: a built-in retrained
    under the same name, or a directory overwritten in place, gets a new fingerprint
    (:func:`slimdit.io.files_fingerprint`). A hub id is returned as it is."""
    if model in SAMPLERS:
        return model
    src = resolve_model_dir(model)
    return files_fingerprint(src) if isinstance(src, Path) else src


def load_pipeline(model: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline for ``model`` (built-in name, directory or hub id)."""
    from diffusers import DiffusionPipeline

    for module in COMPONENTS.values():  # a world's pipeline components (a custom VAE): diffusers finds a class
        importlib.import_module(module)  # only once its module is imported
    src = resolve_model_dir(model)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if isinstance(src, Path) and (src / "transformer" / LOWRANK_INDEX).exists():
        kwargs["transformer"] = load_model(src / "transformer", dtype=dtype)  # a low-rank student
    try:
        pipe = DiffusionPipeline.from_pretrained(src, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {model!r}: {e}") from e
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _pipeline_class(model: str) -> str | None:
    """The pipeline class a model directory (or a cached hub model) names in ``model_index.json``."""
    src = resolve_model_dir(model)
    index = src / "model_index.json" if isinstance(src, Path) else None
    if index is None and _cached_hub_model(model):
        from huggingface_hub import try_to_load_from_cache

        index = Path(try_to_load_from_cache(model, "model_index.json"))
    return json.loads(index.read_text()).get("_class_name") if index is not None and index.exists() else None


def sampling_defaults(model: str) -> dict:
    """How ``model`` samples by default: what its directory records in ``slimdit.json``, else its architecture's
    published defaults, from the adapter of its pipeline class (PixArt-Sigma: thesis table 4.3; Flux-dev: 4.4)."""
    from slimdit.models import ADAPTERS

    src = resolve_model_dir(model)
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


def sampling_options(defaults: dict, steps: int | None = None, guidance: float | None = None,
                     batch_size: int = 64) -> SamplingOptions:
    """Sampling options from a model's ``defaults`` (:func:`sampling_defaults`), overridden where given; what the
    defaults hold beyond steps, guidance and prompt length (e.g. ``height``) is passed to the pipeline as is."""
    known = {"num_inference_steps", "guidance_scale", "max_sequence_length"}
    return SamplingOptions(num_inference_steps=steps or defaults["num_inference_steps"],
                           guidance_scale=defaults["guidance_scale"] if guidance is None else guidance,
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
    opts = sampling_options(sampling_defaults(model), steps, guidance, batch_size)
    return PipelineSampler(pipe, opts, name=name or model)


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
    if source is not None:
        src = resolve_model_dir(source)
        if isinstance(src, Path) and (src / "slimdit.json").exists():
            shutil.copy(src / "slimdit.json", out / "slimdit.json")
    return out
