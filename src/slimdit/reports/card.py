"""Model cards: the ``README.md`` a saved student carries, written from what its run directory records.

A card opens with the Hugging Face Hub's YAML header (``base_model`` when the teacher is a hub id, ``library_name:
diffusers``, ``tags``) and says what was removed or compressed (units, ops, ranks, the block parameter ratio), how the
student was trained (schedule, protocol, KD preset, steps), its measured metrics beside the teacher's where the run
measured them, and how to load it. It reads only files: ``plan.json`` (or ``stages/*/plan.json``), ``config.yaml``,
``summary.json``, ``metrics/*.json`` (or the last stage's ``eval.json``) and ``phases/*/done.json``. So
:func:`write_card` is safe to call again whenever the run adds a file, say an evaluation after the save: the card
then says what the run now knows.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from slimdit.io import atomic_write_text
from slimdit.models.storage import LOWRANK_INDEX
from slimdit.reports.run_facts import RunFacts, is_hub_id, json_or_none, mixed_scorers, run_of

# the keys of a metrics JSON that describe how it was measured, not what
PROTOCOL_KEYS = ("benchmark", "model", "embedder", "n_images", "images_per_prompt", "n_prompts", "seed", "steps",
                 "guidance")
LOWER_IS_BETTER = ("fid", "cmmd")
MAIN_METRICS = ("overall", "fid", "cmmd", "clip_score")


# ---- rendering ------------------------------------------------------------------------------------------------
def _header(f: RunFacts, lowrank: bool, merged: bool) -> str:
    ops = {u["op"] for s in f.stages for u in s.record["units"]}
    tags = ["slimdit", "text-to-image", "diffusion-transformer", "model-compression"]
    for tag, holds in (("block-pruning", "remove" in ops), ("low-rank", "svd" in ops),
                       ("knowledge-distillation", f.trained), ("merged", merged),
                       ("progressive-distillation", any(r.get("method", "progressive") == "progressive"
                                                         for r in f.rounds)),
                       ("consistency-distillation", any(r.get("method") == "consistency" for r in f.rounds)),
                       ("reflow", any(r.get("method") == "reflow" for r in f.rounds)),
                       ("direct-distillation", any(r.get("method") == "direct" for r in f.rounds)),
                       ("distribution-matching-distillation", any(r.get("method") == "dmd2" for r in f.rounds)),
                       ("adversarial-distillation", any(r.get("method") == "ladd" for r in f.rounds)),
                       ("few-step", bool(f.rounds)), ("reward-tuning", bool((f.config or {}).get("reward")))):
        if holds:
            tags.append(tag)
    if f.stages:
        tags.append(f.stages[0].record["adapter"])
    meta: dict[str, Any] = {}
    if is_hub_id(f.teacher):
        meta["base_model"] = f.teacher
    meta.update({"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip()]
    if not is_hub_id(f.teacher):
        lines.append(f"# base_model: the teacher ({f.teacher or 'unknown'}) is not a hub id; name it here if it is "
                     "published")
    lines.append("---")
    if lowrank:
        lines.append("<!-- a slimdit low-rank student: plain diffusers cannot load it; see 'How to load' -->")
    return "\n".join(lines)


def _intro(f: RunFacts, lowrank: bool, merged_from: str | None, merged_params: int | None) -> str:
    units = [u for s in f.stages for u in s.record["units"]]
    removed = sum(u["op"] == "remove" for u in units)
    factored = sum(u["op"] == "svd" for u in units)
    what = [f"{removed} unit(s) removed"] if removed else []
    what += [f"{factored} unit(s) low-rank (SVD) factored"] if factored else []
    teacher = f"`{f.teacher}`" if f.teacher else "an unrecorded teacher"
    text = [f"A student of {teacher}, made with slimdit by compressing its transformer"
            + (f" ({' and '.join(what)})" if what else "")
            + (", then distilled from the teacher." if f.trained else ".")]
    if (bp := f.block_params) is not None:
        text.append(f"Its transformer blocks hold {bp[1]:,} parameters, {bp[1] / bp[0]:.1%} of the teacher's "
                    f"{bp[0]:,}.")
    if merged_from is not None:
        size = ""
        if merged_params is not None:
            share = f" ({merged_params / bp[0]:.1%} of the teacher's)" if bp else ""
            size = f"; its blocks hold {merged_params:,} parameters{share}, so only removed units save size and time"
        text.append(f"This folder is the dense (merged) export of `{merged_from}`: every low-rank layer was "
                    f"multiplied back into one dense matrix, so plain diffusers loads it{size}. Its outputs are the "
                    "low-rank student's up to rounding.")
    return " ".join(text)


def _refining_round(refine: dict | None) -> str:
    """The refining round's own settings, as a bracket after the run's (empty without one)."""
    if not refine:
        return ""
    ema = f", its EMA {refine['ema_decay']} saved" if refine.get("ema_decay") else ""
    return f" (the refining round: {refine.get('steps')} at lr {refine.get('lr')}{ema})"


def _fewstep(f: RunFacts) -> str:
    c = f.config or {}
    first, last = f.rounds[0], f.rounds[-1]
    t = c.get("train", {})
    if first.get("method") == "consistency":
        sched = first.get("scheduler", "LCMScheduler")
        flow = sched.startswith("FlowMatch")
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by latent consistency distillation (Luo et "
               f"al. 2023): it samples in {last['steps']} steps by default with the {sched} saved beside it, and "
               "in any other count (1, 2, 4, 8) by setting num_inference_steps. It learnt to map every point of the "
               f"teacher's {first['teacher_steps']}-point {'Euler' if flow else 'DDIM'} trajectories to the same "
               "clean sample. " + (f"It takes a guidance input, trained at every scale in {list(c['guidance_range'])}"
                                   if c.get("guidance_range") else "A CFG teacher's guidance is distilled in, so the "
                                   "student samples without CFG; a guidance-distilled teacher's guidance input is the "
                                   "student's too") + ": one transformer pass per step.")
    elif first.get("method") == "reflow":
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by rectified-flow reflow (Liu et al. 2023): "
               f"the teacher's {first['teacher_steps']}-step ODE paired noise with the sample it flows to, and the "
               "student learnt the straight line between them, so its Euler sampler (saved beside it) loses less at "
               f"{last['steps']} steps. A guidance-embedded teacher's pairs were made at its default guidance, which "
               "the student takes as its input; a CFG teacher's guidance is distilled in.")
    elif first.get("method") == "direct":
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by direct distillation of the teacher's "
               f"sampler (Luhman & Luhman 2021): the teacher's {first['teacher_steps']}-step deterministic sampling "
               "paired noise with the sample it ends at, and the student's own sampler, run from that noise with "
               f"the gradient through all of its {last['steps']} step(s), learnt to end at the same sample. It samples "
               "with the scheduler saved beside it; a CFG teacher's guidance is distilled in, a guidance-embedded "
               "teacher's default guidance is the student's input.")
    elif first.get("method") == "dmd2":
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by distribution matching distillation in "
               f"DMD2's form (Yin et al. 2024): it samples in {last['steps']} deterministic steps with the scheduler "
               "saved beside it. Its samples (from every step of its grid, reached by running itself) were pulled "
               "onto the teacher's distribution by the difference of the teacher's score and a fake score trained "
               f"on the student's own samples ({c.get('fake_updates', 5)} fake updates per student update). A CFG "
               "teacher's guidance is distilled in, so the student samples without CFG, one pass per step.")
    elif first.get("method") == "ladd":
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by latent adversarial diffusion distillation "
               f"(LADD, Sauer et al. 2024): it samples in {last['steps']} deterministic steps with the scheduler saved "
               "beside it. Its samples (from every step of its grid, reached by running itself) were trained against "
               "a discriminator made of the frozen teacher's features with small trained heads, which told them "
               "from the training data's latents. It samples without CFG, one pass per step.")
    else:
        how = (f"A few-step student of `{f.teacher}`, made with slimdit by progressive distillation (Salimans & Ho "
               f"2022): it samples in {last['steps']} deterministic steps with the scheduler saved beside it, where "
               f"the first round's teacher took {first['teacher_steps']}. Each round halves the steps: one student "
               "step learns to land where two steps of the round's teacher land. A CFG teacher's guided steps are "
               "distilled in the first round, so the student samples without CFG, one transformer pass per step.")
        if last.get("method") == "dmd2":
            how += (f" A last round of distribution matching (DMD2, Yin et al. 2024) at {last['steps']} steps then "
                    "pulled the student's own samples onto the teacher's guided distribution, with a fake score "
                    f"trained beside it ({c.get('fake_updates', 5)} fake updates per student update).")
        elif last.get("method") == "ladd":
            how += (f" A last round of latent adversarial distillation (LADD, Sauer et al. 2024) at {last['steps']} "
                    "steps then trained the student's own samples against a discriminator made of the frozen "
                    "teacher's features with small trained heads, which told them from the training data's latents.")
    out = [how + " Its transformer has the teacher's architecture.", "", "## How it was trained", "",
           f"- {t.get('steps', '?')} optimizer steps per round, batch {t.get('batch_size', '?')}, "
           f"{t.get('optimizer', '?')} at lr {t.get('lr', '?')}"
           + _refining_round(c.get("refine"))
           + f"; data `{(c.get('data') or {}).get('real', '?')}`",
           "", "| round | method | student steps | teacher steps | optimizer steps | seconds | last loss |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {i} | {r.get('method', '')} | {r['steps']} | {r['teacher_steps'] or '–'} | {r['train_steps']} | "
            f"{r.get('seconds', '')} | "
            f"{_fmt((r.get('last') or {}).get('total'))} |" for i, r in enumerate(f.rounds)]
    return "\n".join(out)


def _setting(spec: Any) -> str:
    if spec == "remove":
        return ""
    r = spec["svd"]
    if not isinstance(r, dict):
        return f"c = {r:g}, every part"
    return ", ".join(f"{part} rank {v['rank']}" if isinstance(v, dict) else f"{part} c = {v:g}"
                     for part, v in r.items())


def _ranks(layers: list[dict]) -> str:
    counts = Counter(layer["rank"] for layer in layers)
    return ", ".join(f"{r} ×{n}" for r, n in sorted(counts.items(), reverse=True))


def _compression(f: RunFacts) -> str:
    if not f.stages:
        return "## What was compressed\n\nThe run directory that made this student records no plan."
    out = ["## What was compressed", "",
           "Units are transformer blocks; `remove` deletes a block (eq. 4.6 of the thesis *Diffusion Model "
           "Distillation*), `svd` replaces each linear layer of a part by two low-rank factors (eq. 4.7-4.9), at a "
           "removal fraction c of its weights or an explicit rank."]
    for s in f.stages:
        rec = s.record
        out += ["", f"### {s.label.capitalize()}", ""] if s.label else [""]
        how = ""
        if s.plan.get("grasp"):
            how = (" Singular values chosen by GRASP (thesis section 4.4.4) on "
                   f"{s.plan['grasp'].get('images', 200)} calibration images.")
        elif any(u["op"] == "svd" for u in rec["units"]):
            how = " SVD keeps the largest singular values."
        out += [f"Block parameters {rec['block_params_before']:,} → {rec['block_params_after']:,} "
                f"({rec['block_params_after'] / rec['block_params_before']:.1%}).{how}", "",
                "| unit | op | setting | ranks (× layers) | parameters before → after | kept |",
                "|---|---|---|---|---|---|"]
        for u in rec["units"]:
            name = u["unit"]
            if s.teacher_names.get(name, name) != name:
                name = f"{name} (teacher {s.teacher_names[name]})"
            kept = u["params_after"] / u["params_before"] if u["params_before"] else 0.0
            out.append(f"| {name} | {u['op']} | {_setting(s.plan['units'].get(u['unit'], ''))} | "
                       f"{_ranks(u['layers'])} | {u['params_before']:,} → {u['params_after']:,} | {kept:.1%} |")
        layers = [layer for u in rec["units"] for layer in u["layers"]]
        if layers:
            out += ["", "<details><summary>Every factored layer</summary>", "",
                    "| layer | shape (out × in) | rank |", "|---|---|---|"]
            out += [f"| {x['path']} | {x['shape'][0]} × {x['shape'][1]} | {x['rank']} |" for x in layers]
            out += ["", "</details>"]
    return "\n".join(out)


def _units_per_stage(k) -> str:
    return "per stage, the number of units eq. 4.21 fits best (auto)" if k == "auto" else f"{k} units per stage"


def _training(f: RunFacts) -> str:
    out = ["## How it was trained", ""]
    c = f.config
    if c is None or "train" not in c:
        out.append("Not trained: compressed only (`slimdit compress`). Distilling it from the teacher "
                   "(`slimdit distill`) recovers quality.")
        return "\n".join(out)
    t, sched = c["train"], c.get("schedule")
    if sched:
        out.append(f"- schedule: `{sched['kind']}` ({sched['op']}) to {sched['target']:.0%} of the teacher's block "
                   f"parameters over at most {sched['stages'] if sched['kind'] != 'one_shot' else 1} stage(s)"
                   + (f"; {_units_per_stage(sched['units_per_stage'])}, base ratio {sched['base_ratio']}, scored at "
                      f"c = {sched['c_fixed']} (eq. 4.15-4.21)" if sched["kind"] == "linear_progressive" else "")
                   + (f"; CMMD threshold {sched['cmmd_threshold']}" if sched["kind"] == "progressive" else ""))
    protocol = c.get("protocol")
    protocol = protocol if isinstance(protocol, str) else ", ".join(p["name"] for p in protocol or [])
    out += [f"- protocol: `{protocol}`; KD preset `{t['kd']}` (eq. 4.10-4.14)",
            f"- {t['steps']:,} optimizer steps{' per stage' if sched else ''}, batch {t['batch_size']}"
            + (f" × {t['grad_accum']} accumulated" if t.get("grad_accum", 1) > 1 else "")
            + f", {t['optimizer']} at lr {t['lr']:g} ({t.get('lr_schedule', 'constant')} after {t['warmup_steps']} "
              f"warm-up steps), gradient clip {t['grad_clip']:g}"
            + (f", EMA {t['ema_decay']}" if t.get("ema_decay") else ""),
            f"- data: `{c['data']['real']}`" + (f"; teacher-generated `{c['data']['synth']}`"
                                               if c["data"].get("synth") else "")]
    if f.phases:
        staged = f.phases[0][0] is not None
        cols = ["stage"] * staged + ["phase", "steps", "trained units", "seconds"]
        out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for label, d in f.phases:
            trainable = d.get("trainable")
            trainable = ", ".join(trainable) if isinstance(trainable, list) else trainable
            cells = [label] * staged + [d["phase"], f"{d['steps']:,}", trainable or "—", d.get("seconds", "—")]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out += ["", "<details><summary>The run's resolved config (config.yaml)</summary>", "", "```yaml",
            yaml.safe_dump(c, sort_keys=False).rstrip(), "```", "", "</details>"]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "—" if v is None else str(v)


def _protocol(f: RunFacts) -> str:
    """How the metrics were measured: from the metrics files (a stage's evaluation records less), else the config."""
    p = {k: v for k, v in ((f.config or {}).get("eval") or {}).items() if v is not None}
    for name in ("untrained", "teacher", "student"):  # the student's record wins
        p.update({k: v for k, v in f.metrics.get(name, {}).items() if k in PROTOCOL_KEYS and v is not None})
    text = [f"On `{p['benchmark']}`" if "benchmark" in p else "Measured"]
    n = p.get("n_prompts", p.get("limit"))
    details = [f"{n} prompts × {p['images_per_prompt']} images" if n and "images_per_prompt" in p else None,
               f"{p['steps']} sampling steps" if "steps" in p else None,
               f"guidance {p['guidance']:g}" if "guidance" in p else None,
               f"seed {p['seed']}" if "seed" in p else None,
               f"embedder `{p['embedder']}`" if "embedder" in p else None]
    details = [d for d in details if d]
    return text[0] + (": " + ", ".join(details) if details else "")


def _reward(f: RunFacts) -> str:
    c, t = f.config or {}, (f.config or {}).get("train", {})
    curve = f.summary.get("reward_curve") or []
    first = sum(r for _, r in curve[:10]) / max(len(curve[:10]), 1) if curve else None
    last = sum(r for _, r in curve[-10:]) / max(len(curve[-10:]), 1) if curve else None
    out = [f"`{f.teacher}`, fine-tuned with slimdit against the reward `{c.get('reward')}` by group-relative policy "
           f"gradient (GRPO, on-policy): for each training prompt of `{(c.get('data') or {}).get('real', '?')}` it "
           f"sampled {c.get('group')} images with a {c.get('sample_steps')}-step stochastic sampler (eta "
           f"{c.get('eta')}); each image's reward, standardised within its group, weighed the log-likelihood of its "
           f"sampling steps, with a KL to the model before tuning (weight {c.get('kl')}). It samples as before "
           "(same scheduler and defaults); its transformer has the same architecture.", "", "## How it was trained",
           "", f"- {t.get('steps', '?')} optimizer steps of {t.get('batch_size', '?')} prompts, "
           f"{t.get('optimizer', '?')} at lr {t.get('lr', '?')}"]
    if first is not None:
        out.append(f"- mean training reward: {first:.3f} over the first 10 steps, {last:.3f} over the last 10")
    out.append("- the reward saw training prompts only; the metrics below are on the benchmark's held-out prompts")
    return "\n".join(out)


def _metrics(f: RunFacts, merged: bool) -> str:
    out = ["## Metrics", ""]
    m = f.metrics
    if not m:
        out.append("Not evaluated yet. `slimdit eval --model <this folder>` measures it; when its run directory gains "
                   "`metrics/student.json`, writing the card again (`slimdit.reports.card.write_card`) adds the "
                   "numbers here.")
        return "\n".join(out)
    ref = m.get("student") or m.get("after") or next(iter(m.values()))
    out.append(_protocol(f) + (" (measured on the low-rank student this was merged from)" if merged else "") + ".")
    if "teacher" not in m:
        out.append("The teacher was not evaluated in this run.")
    cols = [c for c in ("teacher", "untrained", "student", "baseline", "before", "after") if c in m]
    keys = [k for k in MAIN_METRICS if any(k in m[c] for c in cols)]
    keys += [k for k in ref if k not in keys and k not in PROTOCOL_KEYS and isinstance(ref[k], float)]
    mixed = mixed_scorers([m[c] for c in cols])
    ratio = "teacher" in m and "student" in m and mixed is None
    if mixed:
        out.append(mixed + " No student / teacher ratio is given.")
    out += ["", "| metric | " + " | ".join(cols) + " |" + " student / teacher |" * ratio,
            "|---|" + "---|" * (len(cols) + ratio)]
    for k in keys:
        arrow = " ↓" if k in LOWER_IS_BETTER else " ↑"
        row = f"| {k}{arrow} | " + " | ".join(_fmt(m[c].get(k)) for c in cols) + " |"
        if ratio:
            t, s = m["teacher"].get(k), m["student"].get(k)
            row += f" {s / t:.1%} |" if isinstance(t, (int, float)) and isinstance(s, (int, float)) and t else " — |"
        out.append(row)
    stages = f.summary.get("stages") if isinstance(f.summary.get("stages"), list) else []
    if len(stages) > 1:
        out += ["", "Per stage:", "", "| stage | units | block parameter ratio | overall ↑ | fid ↓ | cmmd ↓ |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['stage']} | {', '.join(r.get('units', []))} | {r.get('block_param_ratio', 0):.1%} | "
                f"{_fmt(r.get('overall'))} | {_fmt(r.get('fid'))} | {_fmt(r.get('cmmd'))} |" for r in stages]
    demo_student = f.summary.get("student") if isinstance(f.summary.get("student"), dict) else {}  # distill: a path
    speed = f.summary.get("bench") or {k: v for k, v in demo_student.items() if k in ("latency_ratio", "flop_ratio")}
    if speed and not merged:
        out += ["", "Against the teacher (`slimdit bench`): "
                + ", ".join(f"{k.replace('_ratio', '')} {v:.1%}" for k, v in speed.items()
                            if isinstance(v, (int, float))) + "."]
    return "\n".join(out)


def _call_kwargs(student: Path, index: dict) -> dict:
    """How the student samples by default: its recorded sampling settings (``slimdit.json``, the teacher's) and the
    keyword arguments its architecture's pipeline is always called with (the adapter's ``call_defaults``)."""
    from slimdit.models import ADAPTERS

    kwargs = dict((json_or_none(student / "slimdit.json") or {}).get("sampling", {}))
    for adapter in ADAPTERS.values():
        if index.get("_class_name") in adapter.pipelines:
            kwargs.update(adapter.call_defaults)
    return kwargs


def _loading(student: Path, lowrank: bool) -> str:
    from slimdit.identity import recorded_commit
    from slimdit.pipelines.loading import BASE_FILE, resolve_model_dir, student_base
    from slimdit.registry import COMPONENTS

    base = student_base(str(student))  # None: a standalone pipeline
    src = resolve_model_dir(base) if base is not None else student
    index = (json_or_none(src / "model_index.json") if isinstance(src, Path) else None) or {}
    custom = sorted({COMPONENTS[v[1]] for k, v in index.items()
                     if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] in COMPONENTS})
    call = ", ".join(f"{k}={v!r}" for k, v in _call_kwargs(student, index).items())
    name = f"path/to/{student.name}"
    sample = f"image = pipe(\"<your prompt>\"{', ' + call if call else ''}).images[0]"
    out = ["## How to load", ""]
    if base is not None:
        out += [f"This folder holds the student's transformer (`transformer/`) and `slimdit_base.json`, which names "
                f"the pipeline it runs in: `{base}` (its text encoders, VAE and scheduler are the teacher's, so they "
                "are not copied here).", ""]
    if lowrank:
        out += ["Plain diffusers cannot load this model: its transformer stores factored (low-rank) layers in "
                "`transformer/lowrank_model.safetensors` with their ranks in `transformer/slimdit_lowrank.json`, and "
                "diffusers' `from_pretrained` of `transformer/` stops with \"no file named "
                "diffusion_pytorch_model.bin found in directory .../transformer\". Load it with slimdit installed:", "",
                "```python", "import slimdit", "", f'pipe = slimdit.load_pipeline("{name}")', sample, "```", "",
                "or write a dense, standalone pipeline that any diffusers user loads (it has the teacher's parameter "
                "count in the factored layers, so it is not smaller or faster there):", "", "```bash",
                f"slimdit export --model {name} --merge --full --out {name}-dense", "```"]
        return "\n".join(out)
    imports = [f"import {m}  # registers a component class this pipeline names" for m in custom]
    if base is None:
        out += ["Its transformer is a plain diffusers model (removed units are gone from the config), so diffusers "
                "loads it:", "", "```python", *imports, "from diffusers import DiffusionPipeline", "",
                f'pipe = DiffusionPipeline.from_pretrained("{name}")', sample, "```"]
        return "\n".join(out)
    cls = json.loads((student / "transformer" / "config.json").read_text())["_class_name"]
    sched = json_or_none(student / "scheduler" / "scheduler_config.json")  # a few-step student samples with its own
    rev = recorded_commit((json_or_none(student / BASE_FILE) or {}).get("base_fingerprint"), base)  # a hub base
    classes = ", ".join(["DiffusionPipeline", cls, *([sched["_class_name"]] if sched else [])])
    out += ["Its transformer is a plain diffusers model (removed units are gone from the config), so diffusers "
            "loads it over the base pipeline" + (", with the scheduler saved beside it" if sched else "") + ":", "",
            "```python", *imports, f"from diffusers import {classes}", "",
            f'transformer = {cls}.from_pretrained("{name}", subfolder="transformer")',
            *([f'scheduler = {sched["_class_name"]}.from_pretrained("{name}", subfolder="scheduler")']
              if sched else []),
            f'pipe = DiffusionPipeline.from_pretrained("{base}", transformer=transformer'
            + (", scheduler=scheduler" if sched else "") + (f', revision="{rev}"' if rev else "") + ")", sample,
            "```", "",
            "or, with slimdit installed, `slimdit.load_pipeline(\"" + name + "\")`; `slimdit export --model "
            f"{name} --full --out {name}-pipeline` writes a standalone pipeline."]
    return "\n".join(out)


def render_card(student: str | Path, run: str | Path | None = None, teacher: str | None = None,
                merged_from: str | None = None, merged_block_params: int | None = None) -> str:
    """The card of the student pipeline in ``student``, from the files of ``run`` (default: :func:`run_of`)."""
    student = Path(student)
    facts = RunFacts.read(Path(run) if run is not None else run_of(student), teacher)
    lowrank = (student / "transformer" / LOWRANK_INDEX).exists()
    merged = merged_from is not None
    title = facts.teacher or "A transformer"
    if not is_hub_id(title) and len(Path(title).parts) > 1:  # a local folder: its name, not this machine's path
        title = Path(title).name
    if (facts.config or {}).get("reward"):  # reward tuning: the same transformer, tuned
        body = [f"# {title}, reward-tuned with slimdit", "", _reward(facts)]
    elif facts.rounds:  # a step distillation: fewer steps, the same transformer
        body = [f"# {title} in {facts.rounds[-1]['steps']} steps, distilled with slimdit", "", _fewstep(facts)]
    else:
        body = [f"# {title}, compressed with slimdit", "", _intro(facts, lowrank, merged_from, merged_block_params),
                "", _compression(facts), "", _training(facts)]
    parts = [_header(facts, lowrank, merged), "", *body, "", _metrics(facts, merged), "",
             _loading(student, lowrank), "",
             "*Written by slimdit from the run directory's records; writing it again brings it up to date.*", ""]
    return "\n".join(parts)


def write_card(student: str | Path, run: str | Path | None = None, teacher: str | None = None,
               merged_from: str | None = None, merged_block_params: int | None = None) -> Path:
    """Write (or rewrite) ``student/README.md``; return its path."""
    path = Path(student) / "README.md"
    atomic_write_text(path, render_card(student, run, teacher, merged_from, merged_block_params))
    return path
