"""Atomic checkpoints: a crash or a full disk never leaves a ``last.pt`` that is not whole.

A checkpoint is written to a temporary file beside its target, fsync'ed, renamed over the
target and the directory fsync'ed (timm's CheckpointSaver does the same). Everything in it
is a tensor or a plain Python value, so it loads with ``torch.load(weights_only=True)``:
no pickle of arbitrary objects, RNG states included.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint cannot be read or is not an effitrain checkpoint."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically; the previous file stays intact on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` a hard link to ``src``'s current content (atomically, no copy): used for
    ``best.pt``, which keeps its content when ``last.pt`` is later replaced."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an effitrain checkpoint (format {FORMAT})")
    return state


def all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter and floating buffer is finite (a sync point: saving only)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


# --- RNG states as tensors and plain values -------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states."""
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # The current device's only: touching the others would create a context on each.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {"mt": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["mt"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
