"""Teacher-generated data (``slimdit synth``): images and captions in the imagefolder layout, resumable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from slimdit.identity import same_value
from slimdit.io import read_json, write_json
from slimdit.pipelines.sampling import Sampler
from slimdit.registry import is_spec, spec_forms


def read_prompts(spec: str) -> list[str]:
    """A registered spec such as ``shapes-train:N[:SEED]`` (training captions, never evaluation prompts) or a text
    file, one per line."""
    if is_spec(spec):
        from slimdit.data.datasets import load_dataset

        return load_dataset(spec).captions
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"prompts {spec!r} is neither {spec_forms()} nor an existing file")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{p} holds no prompts")
    return prompts


def synth_record(sampler: Sampler, prompts: list[str], seed: int, model: str | None = None,
                 prompt_source: str | None = None, by: str = "slimdit synth") -> dict:
    """What makes a synthetic set: the model and its files' fingerprint, the prompts, the seed and the sampling
    settings (steps, guidance, ...; not the batch size, which never changes an image), and who made it (``by``:
    the command, or a run's ``data.synth``)."""
    from slimdit.pipelines.loading import model_fingerprint

    opts = getattr(sampler, "options", None)
    sampling = {k: v for k, v in asdict(opts).items() if k != "batch_size"} if opts is not None else None
    return {"model": model or sampler.name, "weights": model_fingerprint(model) if model else None,
            "prompts": prompt_source, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "images": len(prompts), "seed": seed, "sampling": sampling, "by": by}


RUN_SET = "data.synth of a run"  # ``by`` of the sets runs make for themselves


def made_by_run(folder: str | Path) -> bool:
    """Whether ``folder`` is (or will be) a set that runs make for themselves, checked against its record on every
    use; otherwise it is a user's folder (their own images, or ``slimdit synth``'s), used as it is."""
    folder = Path(folder)
    if (folder / "synth.json").exists():
        return read_json(folder / "synth.json").get("by") == RUN_SET
    return not (folder / "metadata.jsonl").exists()


def check_user_set(folder: str | Path | None) -> None:
    """Refuse a user's synthetic set (``data.synth``) that ``slimdit synth`` has not finished, before a run starts."""
    if folder is None or made_by_run(folder):
        return
    folder = Path(folder)
    rec = read_json(folder / "synth.json") if (folder / "synth.json").exists() else None
    rows = sum(1 for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip())
    if rec is not None and rows < rec["images"]:
        raise ValueError(f"data.synth {folder} holds {rows} of the {rec['images']} images slimdit synth was asked "
                         "for; finish it by rerunning that command")


def _check_folder(out: Path, record: dict, prompts: list[str]) -> int:
    """How many images of ``record`` the folder already holds; refuse a folder made otherwise (never mix sets)."""
    marker, meta = out / "synth.json", out / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines() if x.strip()] if meta.exists() else []
    if marker.exists():
        old = read_json(marker)
        changed = [f"{k}: {old.get(k)!r} -> {record[k]!r}" for k in record
                   if k != "prompts" and not same_value(old.get(k), record[k])]  # the prompts' source is a note
        if changed:
            raise ValueError(f"{out} holds a synthetic set made otherwise ({'; '.join(changed)}); a 'weights' change "
                             "means the model's files changed. Choose another output folder")
        if old.get("weights") != record["weights"]:  # a hub id recorded before its revision: the record gains it
            write_json(marker, {**old, "weights": record["weights"]})
    elif rows:
        raise ValueError(f"{out} already holds {len(rows)} images that slimdit synth did not record (no synth.json); "
                         "choose another output folder")
    for k, row in enumerate(rows):
        if k >= len(prompts) or row.get("text") != prompts[k]:
            raise ValueError(f"{meta}:{k + 1} does not match prompt {k + 1} of this set; choose another output folder")
    return len(rows)


def synthesize(sampler: Sampler, prompts: list[str], out_dir: str | Path, seed: int = 0, chunk: int = 64,
               model: str | None = None, prompt_source: str | None = None, by: str = "slimdit synth") -> Path:
    """Generate one image per prompt into ``out_dir``; a rerun continues after the last finished image.

    ``synth.json`` records what made the folder (:func:`synth_record`); a rerun with another model, other model
    files, other prompts, seed or sampling settings is refused instead of appending a mixed set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = synth_record(sampler, prompts, seed, model, prompt_source, by)
    done = _check_folder(out, record, prompts)
    if not (out / "synth.json").exists():  # written once: a finished folder's files never change on a rerun
        write_json(out / "synth.json", record)
    with (out / "metadata.jsonl").open("a") as f, tqdm(total=len(prompts), initial=done, desc="synth", unit="img",
                                                       dynamic_ncols=True) as bar:
        for start in range(done, len(prompts), chunk):
            batch = prompts[start:start + chunk]
            images = sampler.generate(batch, [seed + start + k for k in range(len(batch))], progress=False)
            for k, (text, img) in enumerate(zip(batch, images)):
                name = f"{start + k:06d}.png"
                Image.fromarray(img).save(out / name)  # the image exists before its row
                f.write(json.dumps({"file_name": name, "text": text, "seed": seed + start + k}) + "\n")
            f.flush()
            bar.update(len(batch))
    return out
