"""Run-directory I/O: atomic writes, and training state as safetensors plus JSON (nothing is ever unpickled)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimdit.errors import OutputError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if ptr in seen else v  # tied weights (T5's shared embedding) are stored twice
        seen.add(ptr)
    save_file(flat, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def each_tensor(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a safetensors file, read one at a time (a process that keeps only its shard of each
    holds one whole tensor at most, not the file)."""
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            yield k, f.get_tensor(k)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{name}"] = val
            else:
                scalars.setdefault(str(idx), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def ensure_writable(path: str | Path, what: str, is_dir: bool = True) -> Path:
    """Check, before any heavy work, that ``path`` (a directory, or a file when ``is_dir`` is false) can be written:
    create the directory (or the file's parent) and write and remove a probe file there. Raises :class:`OutputError`
    with a one-line message naming ``what`` (e.g. ``"eval --out"``), the path and the OS reason."""
    path = Path(path)
    folder = path if is_dir else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not is_dir and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".slimdit-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise OutputError(f"cannot write {what} {path}: {reason}") from e
    return path


CHUNK, SAMPLES = 1 << 16, 16


def files_fingerprint(path: str | Path) -> str:
    """A short digest of a file or a folder's files (hidden ones, such as ``.git`` or ``.cache``, left out): each
    contributes its relative path, size, first and last MiB and 16 chunks spread over the rest (hashing multi-GB
    checkpoints whole would cost more than the checks save)."""
    src = Path(path)
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(
        q for q in src.rglob("*") if q.is_file() and not any(part.startswith(".") for part in q.relative_to(src).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(src).as_posix() if f != src else f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                for k in range(1, SAMPLES + 1):
                    fh.seek((size - CHUNK) * k // (SAMPLES + 1))
                    h.update(fh.read(CHUNK))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]
