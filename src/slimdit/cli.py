"""The ``slimdit`` command: parse arguments and call one library function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimdit.errors import OutputError, RunError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's; 20 for PixArt-Sigma, 50 for Flux-dev)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale: CFG, or a guidance-distilled model's embedded guidance (default: the model's)")


def cmd_demo(a: argparse.Namespace) -> None:
    from slimdit.config import parse_sets
    from slimdit.demo import run_demo

    run = run_demo(a.out, overrides={**parse_sets(a.set), **({"teacher": a.model} if a.model else {}),
                                     **({"fewstep.steps": a.steps} if a.steps else {})})
    summary = json.loads((run / "summary.json").read_text())
    keys = ("shapes_geneval_overall", "fid", "cmmd", "block_params", "latency_ratio", "retained_overall", "steps")
    print(json.dumps({"run": str(run), **{w: {k: summary[w][k] for k in keys if k in summary[w]}
                                          for w in ("teacher", "student")}}, indent=2))
    print(f"report: {run / 'report.html'}")


def cmd_generate(a: argparse.Namespace) -> None:
    from slimdit.pipelines.generate import generate_to_dir

    out = generate_to_dir(a.model, a.prompt, a.out, images_per_prompt=a.num_images, seed=a.seed, steps=a.steps,
                          guidance=a.guidance, vs=a.vs)
    print(f"wrote {out / 'grid.png'}")


def cmd_eval(a: argparse.Namespace) -> None:
    from slimdit.metrics.evaluate import evaluate_model

    r = evaluate_model(a.model, a.benchmark, out=a.out, limit=a.limit, images_per_prompt=a.images_per_prompt,
                       seed=a.seed, steps=a.steps, guidance=a.guidance, embedder=a.embedder,
                       save_images_to=a.save_images, batch_size=a.batch_size, benchmark_data=a.benchmark_data)
    print(json.dumps(r.metrics, indent=2))


def cmd_compress(a: argparse.Namespace) -> None:
    from slimdit.compress.plan import Plan
    from slimdit.compress.student import compress_to_dir, format_record

    record = compress_to_dir(a.model, Plan.load(a.plan), a.out, dry_run=a.dry_run)
    print(format_record(record))
    if not a.dry_run:
        print(f"wrote {a.out}")


def cmd_export(a: argparse.Namespace) -> None:
    from slimdit.compress.student import export_student

    print(f"wrote {export_student(a.model, a.out, merge=a.merge, full=a.full)}")


def cmd_synth(a: argparse.Namespace) -> None:
    from slimdit.data.synth import read_prompts, synthesize
    from slimdit.io import ensure_writable
    from slimdit.pipelines.loading import load_sampler

    prompts = read_prompts(a.prompts)
    ensure_writable(a.out, "synth --out")  # before the model is loaded
    out = synthesize(load_sampler(a.model, steps=a.steps, guidance=a.guidance), prompts, a.out, seed=a.seed,
                     model=a.model, prompt_source=a.prompts)
    print(f"wrote {out} ({len(prompts)} images)")


def cmd_distill(a: argparse.Namespace) -> None:
    from slimdit.config import load_config, parse_sets
    from slimdit.distill.run import run_distill

    cfg = load_config(a.config, overrides=parse_sets(a.set))
    if a.dry_run:
        _distill_dry_run(cfg, a.json, a.processes)
        return
    if a.json:
        raise ValueError("--json goes with --dry-run")
    run = run_distill(cfg)
    if _main_process():  # the others returned before the main process's evaluation wrote the summary
        print(json.dumps(json.loads((run / "summary.json").read_text()), indent=2))


def _distill_dry_run(cfg, as_json: bool, processes: int | None) -> None:
    """The resolved config and the memory plan (from the models' configs alone), without loading a model."""
    import torch
    import yaml

    from slimdit.compress.plan import Plan
    from slimdit.speed.memory import config_memory_plan

    plan = Plan.load(cfg.plan) if isinstance(cfg.plan, str) else Plan.from_dict(cfg.plan)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if processes is None:  # as launched (accelerate launch --num_processes N), else 1
        from slimdit.processes import process_state

        processes = process_state().num_processes
    mp = config_memory_plan(cfg, plan, device, processes=processes, both=True)
    if as_json:
        print(json.dumps({"config": cfg.model_dump(mode="json"), **mp.to_json()}, indent=2, default=str))
        return
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print("\n".join("# " + line for line in mp.table().splitlines()))  # comments: the output stays YAML


def cmd_bench(a: argparse.Namespace) -> None:
    from slimdit.models.arch import is_arch

    if a.memory:
        return _bench_memory(a)
    if is_arch(a.model):
        return _bench_arch(a)
    if a.vs is None or a.plan is not None or a.blocks is not None:
        raise ValueError("bench: a student and its teacher take --model STUDENT --vs TEACHER; --plan and --blocks "
                         "are for random-weight models at real dimensions (--model arch:NAME)")
    from slimdit.speed.bench import bench

    r = bench(a.model, a.vs, repeats=a.repeats, batch_size=a.batch_size or 8, steps=a.steps)
    if a.json:
        print(json.dumps(r.ratios()))
        return
    print(f"latency ratio {r.latency_ratio:.3f}  (student {r.student_latency_s:.3f} s, teacher "
          f"{r.teacher_latency_s:.3f} s; median of {r.repeats}, batch {r.batch_size}, each at its own steps "
          f"(student {r.steps}), {r.device})")
    print(f"param ratio   {r.param_ratio:.3f}  ({r.student_params:,} / {r.teacher_params:,})")
    print(f"FLOP ratio    {r.flop_ratio:.3f}  ({r.student_flops:,} / {r.teacher_flops:,} per sampling call: "
          "transformer passes x steps)")


def _bench_memory(a: argparse.Namespace) -> None:
    """The memory plan of a KD step against its peak measured on real tensors, side by side."""
    from slimdit.compress.plan import Plan
    from slimdit.models.arch import parse_blocks
    from slimdit.speed.memory import GIB, memory_plan
    from slimdit.speed.step import measure_step

    if a.plan is None:
        raise ValueError("bench --memory needs --plan PLAN (the student whose KD step is measured)")
    plan, blocks, batch = Plan.load(a.plan), parse_blocks(a.blocks), a.batch_size or 1
    kw = dict(optimizer=a.optimizer, checkpointing=a.checkpointing, frozen_dtype=a.frozen_dtype,
              mixed_precision=a.mixed_precision)
    step = measure_step(a.model, plan, batch, a.resolution, blocks=blocks, device=a.device, **kw)
    mp = memory_plan(a.model, plan, batch, a.resolution, blocks=blocks, offload_text=True, both=False, **kw)
    r = {"model": a.model, "blocks": a.blocks, "batch_size": batch, "resolution": mp.resolution, **kw,
         "planned_gib": mp.per_device / GIB, "measured_gib": step.peak_bytes / GIB,
         "error": mp.per_device / step.peak_bytes - 1, "items_gib": {k: v / GIB for k, v in mp.items.items()},
         "step": step.to_json()}
    if a.json:
        print(json.dumps(r, indent=2))
        return
    mfu = f", MFU {100 * step.mfu:.1f} %" if step.mfu is not None else ""
    print(f"{a.model} ({a.blocks or 'all'} units), batch {batch} at {mp.resolution} px on {a.device}, "
          f"{a.optimizer}, teacher {a.frozen_dtype}, autocast {a.mixed_precision}, checkpointing "
          f"{'on' if a.checkpointing else 'off'}: planned {r['planned_gib']:.3f} GiB, measured "
          f"{r['measured_gib']:.3f} GiB ({100 * r['error']:+.1f} %); a step {step.step_s:.3f} s, "
          f"{step.samples_per_s:.2f} samples/s, {step.achieved_tflops:.2f} TFLOP/s{mfu}")


def _bench_arch(a: argparse.Namespace) -> None:
    import torch

    from slimdit.compress.plan import Plan
    from slimdit.models.arch import parse_blocks
    from slimdit.speed.arch import bench_arch

    if a.plan is None or a.vs is not None:
        raise ValueError("bench --model arch:NAME measures a plan's student against the unmodified model: give "
                         "--plan PLAN (and --blocks N to cut both to N units per group), not --vs")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if a.dtype not in dtypes:
        raise ValueError(f"--dtype {a.dtype!r}; allowed: {', '.join(dtypes)}")
    r = bench_arch(a.model, Plan.load(a.plan), parse_blocks(a.blocks), a.resolution, a.batch_size or 1,
                   a.repeats, dtypes[a.dtype], profile=a.profile)
    if a.json:
        print(json.dumps(r.to_json(), indent=2))
        return
    s, t = r.student, r.teacher
    print(f"{r.model} cut to {r.blocks}, {r.resolution} px, batch {r.batch_size}, {r.dtype} on {r.device}; "
          f"one transformer forward, median of {r.repeats}")
    print(f"latency ratio     {r.latency_ratio:.3f}  ({s['latency_s']:.3f} s / {t['latency_s']:.3f} s)")
    print(f"FLOP ratio        {r.flop_ratio:.3f}  ({s['flops']:,} / {t['flops']:,})")
    print(f"param ratio       {r.param_ratio:.3f}  ({s['params']:,} / {t['params']:,}; blocks "
          f"{s['block_param_ratio']:.3f})")
    print(f"peak memory ratio {r.peak_memory_ratio:.3f}  ({s['peak_bytes'] / 2**20:.0f} / "
          f"{t['peak_bytes'] / 2**20:.0f} MiB)")
    for name, kinds in r.profile.items():
        print(f"{name} time by kind (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in kinds.items()))


def cmd_report(a: argparse.Namespace) -> None:
    from slimdit.reports.html import build_report

    if not (a.run / "summary.json").exists():
        raise FileNotFoundError(f"{a.run} has no summary.json: not a finished run directory")
    print(f"wrote {build_report(a.run)}")
    if (a.run / "student" / "transformer").is_dir():  # the card picks up metrics added since the run
        from slimdit.reports.card import write_card

        print(f"wrote {write_card(a.run / 'student', a.run)}")


def cmd_analyze(a: argparse.Namespace) -> None:
    from slimdit.data.synth import read_prompts
    from slimdit.importance.analyze import analyze

    criteria = [c.strip() for c in a.criteria.split(",") if c.strip()]
    op = _parse_op(a.op)
    analyze(a.model, criteria, a.out, read_prompts(a.prompts), op=op, steps=a.steps, embedder=a.embedder,
            seed=a.seed)
    print(f"wrote {a.out}/scores.json and plots")


def cmd_run(a: argparse.Namespace) -> None:
    from slimdit.config import RunConfig, load_config, parse_sets
    from slimdit.schedules.run import run_schedule

    cfg = load_config(a.config, RunConfig, overrides=parse_sets(a.set))
    if a.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return
    run = run_schedule(cfg)
    print(json.dumps(json.loads((run / "summary.json").read_text()), indent=2))


def _main_process() -> bool:
    """Whether this is the main process of a multi-process launch (or the only one)."""
    from slimdit.processes import process_state

    return process_state().is_main_process


def cmd_steps(a: argparse.Namespace) -> None:
    from slimdit.config import load_config, parse_sets
    from slimdit.distill.chain import is_chain
    from slimdit.distill.fewstep import StepsConfig, describe_rounds, run_steps

    if is_chain(a.config):
        return _steps_chain(a)
    cfg = load_config(a.config, StepsConfig, overrides=parse_sets(a.set))
    if a.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        print(f"# rounds: {describe_rounds(cfg)}")
        return
    run = run_steps(cfg)
    if _main_process():
        print(json.dumps(json.loads((run / "summary.json").read_text()), indent=2))


def _steps_chain(a: argparse.Namespace) -> None:
    """``slimdit steps --config CHAIN``: the links in turn (``--set`` applies to the chain file's own fields)."""
    from pathlib import Path

    from slimdit.config import load_config, parse_sets
    from slimdit.distill.chain import ChainConfig, link_configs, run_chain
    from slimdit.distill.fewstep import describe_rounds

    cfg = load_config(a.config, ChainConfig, overrides=parse_sets(a.set))
    if a.dry_run:
        for name, link in link_configs(cfg, Path(a.config).parent):
            print(f"# {name}: {link.method}, {describe_rounds(link)}, teacher {link.teacher}, "
                  f"student {link.student or link.teacher}")
        return
    run = run_chain(cfg, base=Path(a.config).parent)
    if _main_process():
        print(json.dumps(json.loads((run / "summary.json").read_text()), indent=2))


def cmd_reward(a: argparse.Namespace) -> None:
    from slimdit.config import load_config, parse_sets
    from slimdit.distill.reward import RewardConfig, run_reward

    cfg = load_config(a.config, RewardConfig, overrides=parse_sets(a.set))
    if a.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        print(f"# {cfg.train.steps} updates x {cfg.train.batch_size} prompts x {cfg.group} images, "
              f"{cfg.sample_steps} sampling steps each")
        return
    run = run_reward(cfg)
    if _main_process():
        print(json.dumps(json.loads((run / "summary.json").read_text()), indent=2))


def _parse_op(text: str) -> str | float:
    if text == "remove":
        return text
    try:
        c = float(text)
    except ValueError:
        c = -1.0
    if not 0 < c < 1:
        raise ValueError(f"--op must be 'remove' or an SVD ratio c in (0, 1), got {text!r}")
    return c


def cmd_search(a: argparse.Namespace) -> None:
    from slimdit.search.run import run_search

    op = _parse_op(a.op)
    r = run_search(a.model, a.out, a.units, a.method, op, a.prompts, a.trials, a.steps, a.embedder, a.seed,
                   pattern=a.pattern, data=a.data, mask_steps=a.mask_steps)
    for m in ("greedy", "optuna", "masks"):
        if m in r:
            print(f"{m:7s} CMMD {r[m]['cmmd']:.4f}  units {', '.join(r[m]['units'])}  ({r[m]['seconds']} s)")
    print(f"wrote {Path(a.out) / 'search.json'}")


def cmd_sweep(a: argparse.Namespace) -> None:
    from slimdit.experiments.sweep import load_sweep, run_sweep

    if a.dry_run:
        sweep, configs = load_sweep(a.sweep)
        for name, cfg in configs:
            print(f"{sweep.out / name}: {cfg.model_dump(mode='json')}")
        return
    out = run_sweep(a.sweep)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}")


def build_parser() -> argparse.ArgumentParser:
    from slimdit.registry import BENCHMARKS, COMMANDS

    ap = argparse.ArgumentParser(prog="slimdit", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the main job on the embedded shapes world")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory; rerun to resume")
    _add_model(p, default=None,
                   help="the teacher (default: the packaged config's, shapes-pixart); any PixArt or Flux pipeline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the packaged demo config (slimdit/demo.yaml), e.g. train.steps=400")
    p.add_argument("--steps", type=int, default=None,
                   help="then make the compressed student sample in this many steps (progressive distillation)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="write images and an enlarged grid for prompts")
    _add_model(p, required=True, help="built-in name, diffusers directory or hub id")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--vs", default=None, metavar="MODEL",
                   help="also draw the same prompts and seeds with MODEL (a teacher, shapes-oracle), side by side")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a model on a benchmark")
    _add_model(p, required=True, help="shapes-pixart, shapes-oracle, a diffusers directory or hub id")
    p.add_argument("--benchmark", default="shapes-geneval", choices=sorted(BENCHMARKS))
    p.add_argument("--out", type=Path, default=None, help="metrics JSON")
    p.add_argument("--limit", type=int, default=None, help="first N prompts")
    p.add_argument("--images-per-prompt", type=int, default=None,
                   help="default: the benchmark's own (4 shapes-geneval/geneval/dpg-bench, 1 cmmd/fid/hpsv2, "
                        "10 imagereward)")
    p.add_argument("--embedder", default="shapes", help="shapes | clip | clip:<hub id or directory>")
    p.add_argument("--save-images", type=Path, default=None, help="also write the images and a grid here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--benchmark-data", type=Path, default=None,
                   help="the benchmark's data: a reference image folder (cmmd, fid), GenEval's checkout, ELLA's "
                        "dpg_bench folder, ...; see docs/benchmarks.md")
    _add_sampling(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="score units (magnitude, CKA, metric) and draw the thesis' plots")
    _add_model(p, required=True)
    p.add_argument("--criteria", default="magnitude,cka,metric",
                   help="comma-separated: magnitude, cka, io_mse (Flux.1 Lite), metric")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", default="shapes-train:32:7", help="calibration prompts: file or shapes-train:N[:SEED]")
    p.add_argument("--op", default="remove", help="how a unit is modified for the metric: remove or an SVD ratio")
    p.add_argument("--embedder", default="shapes")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="apply a plan (remove / SVD units) and save the student")
    _add_model(p, required=True)
    p.add_argument("--plan", type=Path, required=True, help="YAML or JSON plan file")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="print parameters per unit before and after; write nothing")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="export a student")
    _add_model(p, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--merge", action="store_true", help="merge low-rank layers into a dense diffusers model")
    p.add_argument("--full", action="store_true",
                   help="a standalone pipeline (the base's text encoders, VAE and scheduler copied in); with --merge, "
                        "what plain diffusers loads")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="teacher-generated images with captions (resumable)")
    _add_model(p, required=True)
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or shapes-train:N[:SEED]")
    p.add_argument("--out", type=Path, required=True)
    _add_sampling(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("distill", help="compress and distill from one config file (resumable)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.kd=hybrid --set out=runs/x (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the memory plan (from the models' configs alone) and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: as JSON (memory.per_device_gib, memory.fits)")
    p.add_argument("--processes", type=int, default=None,
                   help="with --dry-run: plan for N processes (default: as launched); the batch splits over them and "
                        "train.sharding: fsdp divides the models among them")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("run", help="run a schedule (one-shot, progressive, linear progressive); rerun to continue")
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("steps", help="fewer sampling steps (progressive, consistency, reflow, direct, DMD2, LADD), "
                       "or a chain of such runs (a config with chain:); rerun to continue")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and its rounds, and exit")
    p.set_defaults(func=cmd_steps)

    p = sub.add_parser("reward", help="reward fine-tuning (DRaFT, GRPO, RAFT, DPO against a registered reward, on "
                       "training prompts); rerun to continue")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("search", help="which k units to modify: greedy and Optuna TPE on calibration CMMD, or "
                       "TinyFusion's learnable masks")
    _add_model(p, required=True)
    p.add_argument("--units", type=int, default=None, help="k, how many units to modify (greedy, optuna)")
    p.add_argument("--method", default="both", help="greedy | optuna | both (Optuna starts from greedy's answer) | "
                   "masks (TinyFusion: learn an N:M keep pattern with LoRA recovery)")
    p.add_argument("--pattern", default="1:2", help="masks: keep N of every M consecutive units")
    p.add_argument("--data", default="shapes-train:2048", help="masks: training images (imagefolder or shapes-train:N)")
    p.add_argument("--mask-steps", type=int, default=200, help="masks: training steps")
    p.add_argument("--op", default="remove", help="remove, or an SVD ratio c such as 0.5")
    p.add_argument("--prompts", default="shapes-train:32:7", help="calibration prompts: file or shapes-train:N[:SEED]")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--steps", type=int, default=None, help="sampling steps while scoring (default: the model's)")
    p.add_argument("--embedder", default="shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sweep", help="one run per point of a grid of config overrides (resumable)")
    p.add_argument("sweep", type=Path, help="sweep YAML: kind, out, base, set, grid")
    p.add_argument("--dry-run", action="store_true", help="validate every point and list the run directories")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="latency, parameter and FLOP ratios of a student against its teacher")
    _add_model(p, required=True, help="the student, or arch:pixart-sigma-xl / arch:flux-dev (random weights at "
               "the real dimensions, with --plan)")
    p.add_argument("--vs", default=None, help="the teacher")
    p.add_argument("--plan", type=Path, default=None, help="arch models: the plan whose student is measured")
    p.add_argument("--blocks", default=None, help="arch models: cut both to N units per group (or double=2,single=4)")
    p.add_argument("--resolution", type=int, default=None, help="arch models: image size (default: the model's)")
    p.add_argument("--dtype", default="float32", help="arch models: float32 | bfloat16 | float16")
    p.add_argument("--profile", action="store_true", help="arch models: where each one's time goes")
    p.add_argument("--memory", action="store_true",
                   help="the memory plan of one KD step of the --plan student against the peak measured on real "
                        "tensors (text encoders and VAE aside)")
    p.add_argument("--optimizer", default="came", help="with --memory: came | adamw")
    p.add_argument("--checkpointing", action="store_true", help="with --memory: gradient checkpointing on")
    p.add_argument("--device", default="cpu", help="with --memory: where the step runs (cuda: peak by "
                   "max_memory_allocated, MFU of the device's bf16 peak)")
    p.add_argument("--frozen-dtype", default="fp32", help="with --memory: the teacher's dtype, fp32 | bf16 | fp16")
    p.add_argument("--mixed-precision", default="no", help="with --memory: the student's autocast, no | bf16 | fp16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 images (arch models: 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the ratios as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild report.html of a run directory from its files")
    p.add_argument("run", type=Path)
    p.set_defaults(func=cmd_report)

    for add_commands in COMMANDS.values():  # the subcommands the worlds add
        add_commands(sub)
    return ap


def _os_message(e: OSError) -> str:
    """``<filename>: <strerror>`` for an error the OS raised; the message itself for one we raised."""
    if not e.strerror:
        return str(e) or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {e.strerror}" if names else e.strerror


def _fail(message: str, code: int) -> int:
    print(f"slimdit: error: {message}", file=sys.stderr)
    return code


def _add_model(p: argparse.ArgumentParser, **kwargs) -> None:
    """``--model`` and, beside it, ``--transformer`` (a transformer-only repo or directory over the model)."""
    p.add_argument("--model", **kwargs)
    p.add_argument("--transformer", default=None, metavar="PATH",
                   help="take the transformer from here (a transformer-only hub repo or directory, e.g. "
                        "PixArt-alpha/PixArt-Sigma-XL-2-512-MS) and the rest from --model")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "transformer", None):
            from slimdit.pipelines.loading import join_model

            if not args.model:
                raise ValueError("--transformer needs --model, the base pipeline that supplies the other components")
            args.model = join_model(args.model, args.transformer)
        args.func(args)
    except OutputError as e:
        if e.payload is not None:  # what could not be written (e.g. the metrics) is not lost
            print(json.dumps(e.payload, indent=2, default=str), flush=True)
        return _fail(str(e), 1)
    except RunError as e:
        return _fail(str(e), 1)
    except ValueError as e:
        return _fail(str(e), 2)
    except OSError as e:  # FileNotFoundError and FileExistsError included
        return _fail(_os_message(e), 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
