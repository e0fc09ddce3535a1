"""``slimdit teacher``: reproduce the shapes world's built-in weights (teacher and embedder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_teacher_train(a: argparse.Namespace) -> None:
    from slimdit.config import parse_sets
    from slimdit.worlds.shapes.teacher import branch_run, teacher_config, train_teacher

    resumable = {"threads": a.threads, "device": a.device, "data_workers": a.data_workers}
    steps = {"steps": a.steps} if a.steps else {}
    recipe = parse_sets(a.set)
    if a.source is not None:  # the branch takes the recipe changes; the new run then resumes as usual
        branch_run(a.source, a.out, {**recipe, **steps}, a.from_step)
        print(f"branched {a.out} from {a.source}")
        recipe = {}
    cfg = teacher_config(a.out, recipe, **resumable, **steps)
    run = train_teacher(a.out, cfg, max_minutes=a.max_minutes)
    print(f"teacher run: {run} (resume by running the same command again)")


def cmd_teacher_export(a: argparse.Namespace) -> None:
    from slimdit.worlds.shapes.teacher import export_teacher

    print(f"wrote {export_teacher(a.run, a.out, use_ema=not a.no_ema, step=a.step)}")


def cmd_teacher_probe(a: argparse.Namespace) -> None:
    from slimdit.worlds.shapes.probe import probe_denoiser

    r = probe_denoiser(a.model, n=a.n, out_png=a.png)
    print(json.dumps(r, indent=2))


def cmd_probe_binding(a: argparse.Namespace) -> None:
    from dataclasses import asdict

    from slimdit.io import write_json
    from slimdit.worlds.shapes.binding import probe_binding

    r = probe_binding(a.model, seeds=a.seeds, steps=a.steps)
    print(r.table())
    if a.json:
        write_json(a.json, asdict(r))


def cmd_teacher_embedder(a: argparse.Namespace) -> None:
    from slimdit.worlds.shapes.embedder import EmbedderConfig, train_embedder

    train_embedder(a.out, EmbedderConfig(steps=a.steps))
    print(f"wrote {a.out}")


def cmd_flux_train(a: argparse.Namespace) -> None:
    from slimdit.config import parse_sets
    from slimdit.worlds.shapes.flux_teacher import branch_flux_run, flux_config, train_flux_base

    resumable = {k: v for k, v in {"steps": a.steps, "threads": a.threads, "device": a.device}.items() if v}
    recipe = parse_sets(a.set)
    if a.source is not None:  # the branch takes the recipe changes; the new run then resumes as usual
        branch_flux_run(a.source, a.out, {**recipe, **resumable}, a.from_step)
        print(f"branched {a.out} from {a.source}")
        recipe = {}
    cfg = flux_config(a.out, {**recipe, **resumable})
    run = train_flux_base(a.out, cfg, max_minutes=a.max_minutes)
    print(f"shapes-flux base run: {run} (resume by running the same command again)")


def cmd_flux_export(a: argparse.Namespace) -> None:
    from slimdit.worlds.shapes.flux_teacher import export_flux_base

    print(f"wrote {export_flux_base(a.run, a.out, use_ema=a.ema, empty_pooled=a.empty_pooled)}")


def cmd_guidance_distill(a: argparse.Namespace) -> None:
    from slimdit.worlds.shapes.flux_teacher import guidance_distill

    train = {"steps": a.steps} if a.steps else {}
    print(f"wrote {guidance_distill(a.base, a.run, a.out, data=a.data, train=train)}")


def _add_flux(t: argparse._SubParsersAction) -> None:
    p = t.add_parser("train-flux", help="train the shapes-flux base: autoencoder, then a CFG Flux by rectified flow "
                     "(resumable)")
    p.add_argument("--out", type=Path, required=True, help="run directory; rerun to resume")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the run's, 30,000 for a new one)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe field of a new run")
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="start a new run from another run's checkpoint, changing only optimisation fields with "
                        "--set (e.g. --set anneal_start=8000 --steps 12000 to anneal a constant-rate run)")
    p.add_argument("--from-step", type=int, default=None, help="the checkpoint --from starts at (default: last)")
    p.set_defaults(func=cmd_flux_train)
    p = t.add_parser("export-flux", help="write a shapes-flux base run as a FluxPipeline (true CFG)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ema", action="store_true", help="the EMA weights instead of the raw ones")
    p.add_argument("--empty-pooled", action="store_true",
                   help="an ablation: every prompt gets the empty caption's pooled CLIP vector, so an eval shows what "
                        "reaches the image through T5 and the joint attention alone")
    p.set_defaults(func=cmd_flux_export)
    p = t.add_parser("guidance-distill", help="distil a CFG Flux base into a guidance-embedded one-pass model "
                     "(resumable)")
    p.add_argument("--base", type=Path, required=True, help="the base FluxPipeline directory (export-flux)")
    p.add_argument("--run", type=Path, required=True, help="trainer run directory; rerun to resume")
    p.add_argument("--out", type=Path, required=True, help="the guided FluxPipeline directory")
    p.add_argument("--data", default="shapes-train:8192", help="captions and images to distil on")
    p.add_argument("--steps", type=int, default=None)
    p.set_defaults(func=cmd_guidance_distill)


def add_teacher_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``slimdit teacher train|export|probe|train-embedder`` to the CLI's subcommands ``sub``."""
    t = sub.add_parser("teacher", help="reproduce the shapes world's built-in weights").add_subparsers(
        dest="teacher_command", required=True)
    _add_train(t)
    _add_flux(t)
    p = t.add_parser("export", help="write a teacher run as a diffusers pipeline directory")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_teacher_export)
    p = t.add_parser("probe", help="one-step x0 guesses per noise level on training scenes (numbers and a grid)")
    p.add_argument("--model", default="shapes-pixart")
    p.add_argument("--n", type=int, default=32, help="training scenes")
    p.add_argument("--png", type=Path, default=None, help="write the grid here")
    p.set_defaults(func=cmd_teacher_probe)
    p = t.add_parser("probe-binding", help="a Flux pipeline's attention of image tokens to their own object's "
                     "colour word against the other's, per block, on two-object colour prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures, per image too, here")
    p.set_defaults(func=cmd_probe_binding)
    p = t.add_parser("train-embedder", help="train the shapes embedder used by FID/CMMD/CLIP score")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=800)
    p.set_defaults(func=cmd_teacher_embedder)


def _add_train(t: argparse._SubParsersAction) -> None:
    p = t.add_parser("train", help="train the shapes-pixart teacher (resumable)")
    p.add_argument("--out", type=Path, required=True, help="run directory; rerun to resume")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the run's, 30,000 for a new one)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-workers", type=int, default=0, help="processes rendering scenes ahead (use on a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe field of a new run (e.g. high_noise_weight=20); a resumed run keeps its recipe")
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="start a new run from another run's checkpoint, changing only optimisation fields with "
                        "--set (e.g. anneal_start=6000 --steps 12000 to anneal a constant-rate run)")
    p.add_argument("--from-step", type=int, default=None, help="the checkpoint --from starts at (default: last)")
    p.set_defaults(func=cmd_teacher_train)
