"""``slimdit eval``: run a benchmark on a model and write its metrics as JSON."""

from __future__ import annotations

from pathlib import Path

from slimdit.errors import OutputError
from slimdit.io import ensure_writable, read_json, write_json
from slimdit.metrics.benchmarks import BENCHMARKS, EvalResult
from slimdit.metrics.embedders import get_embedder
from slimdit.pipelines.loading import load_sampler
from slimdit.registry import SAMPLERS
from slimdit.reports.grids import make_grid, save_images


def evaluate_model(model: str, benchmark: str = "shapes-geneval", out: str | Path | None = None,
                   limit: int | None = None, images_per_prompt: int | None = None, seed: int = 0,
                   steps: int | None = None, guidance: float | None = None, embedder: str = "shapes",
                   save_images_to: str | Path | None = None, batch_size: int = 64,
                   benchmark_data: str | Path | None = None) -> EvalResult:
    """Evaluate ``model`` on ``benchmark``; write metrics to ``out`` and, optionally, the images and a grid.
    ``images_per_prompt`` defaults to the benchmark's own number; ``benchmark_data`` is the data path a benchmark
    that reads data takes (GenEval's checkout, a reference set, ...; ``Benchmark.data`` says which)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; allowed: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[benchmark]
    images_per_prompt = bench.images_per_prompt if images_per_prompt is None else images_per_prompt
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    if benchmark_data is not None and bench.data is None:
        raise ValueError(f"benchmark {benchmark!r} takes no --benchmark-data, got {benchmark_data}")
    # check the arguments (and a data-reading benchmark's data, packages and weights), and load the embedder,
    # before the model
    data = {} if bench.data is None else {"data": benchmark_data}
    if data:
        bench.check(limit, images_per_prompt=images_per_prompt, **data)
    else:
        bench.check(limit)
    if out is not None:
        ensure_writable(out, "eval --out", is_dir=False)
    if save_images_to is not None:
        ensure_writable(save_images_to, "eval --save-images")
    emb = {"embedder": get_embedder(embedder)} if bench.embedder else {}
    sampler = load_sampler(model, steps=steps, guidance=guidance, batch_size=batch_size)
    result = bench(sampler, limit=limit, images_per_prompt=images_per_prompt, seed=seed, **emb, **data)
    if emb and embedder != "shapes" and "scored_by" in result.metrics:  # its scorer digests the default embedder
        result.metrics["scored_by"] += f"+embedder:{embedder}"
    result.metrics.update(model=model, benchmark=benchmark)
    if steps is not None or guidance is not None or model not in SAMPLERS:
        opts = getattr(sampler, "options", None)
        if opts is not None:
            result.metrics.update(steps=opts.num_inference_steps, guidance=_guidance(sampler, opts))
    _write_outputs(result, out, save_images_to, images_per_prompt)
    return result


def saved_metrics(path: str | Path, benchmark: str) -> dict | None:
    """The metrics saved at ``path`` if ``benchmark`` would score them the same way now; None if there are none, or
    if they were scored otherwise (a changed detector or scoring weights, or a record from before scorers were
    recorded) and must be made again. A benchmark that records no scorer reuses what is there."""
    path = Path(path)
    if not path.exists():
        return None
    saved = read_json(path)
    scorer = BENCHMARKS[benchmark].scorer if benchmark in BENCHMARKS else None
    if scorer is not None and saved.get("scored_by") != scorer():
        return None
    return saved


def saved_or_evaluated(path: str | Path, model: str, benchmark: str, **kwargs) -> dict:
    """The metrics of ``model`` on ``benchmark``: those saved at ``path`` if scored as they would be now
    (:func:`saved_metrics`), else evaluated now and saved there (``kwargs``: :func:`evaluate_model`'s)."""
    m = saved_metrics(path, benchmark)
    return m if m is not None else evaluate_model(model, benchmark, out=path, **kwargs).metrics


def _guidance(sampler, opts) -> float:
    """The scale the model was guided with, as its adapter reads it (a true-CFG model's is not ``guidance_scale``)."""
    from slimdit.models import adapter_for

    pipe = getattr(sampler, "pipe", None)
    if pipe is None:
        return opts.guidance_scale
    return adapter_for(pipe.transformer).guidance_scale(pipe.transformer,
                                                         {"guidance_scale": opts.guidance_scale, **opts.extra})


def _write_outputs(result: EvalResult, out: str | Path | None, save_images_to: str | Path | None,
                   images_per_prompt: int) -> None:
    """Write the metrics and images. If the disk fails now, after sampling, the metrics still reach the caller as
    the payload of an :class:`OutputError`."""
    try:
        if out is not None:
            write_json(out, result.metrics)
    except OSError as e:
        raise _output_error("eval --out", out, e, result.metrics) from e
    if save_images_to is None:
        return
    try:
        save_images(result.images, save_images_to)
        make_grid(result.images, ncol=images_per_prompt, marks=result.correct).save(Path(save_images_to) / "grid.png")
    except OSError as e:
        raise _output_error("eval --save-images", save_images_to, e, result.metrics) from e


def _output_error(what: str, path: str | Path, e: OSError, metrics: dict) -> OutputError:
    return OutputError(f"cannot write {what} {path}: {e.strerror or e}", payload=metrics)
