"""Files of a run, written so that a crash, a kill or a full disk never loses the last good one.

Every write is atomic: the bytes are made in memory, written to a temporary file beside the
target (``.NAME.tmp-PID``), flushed to disk, then renamed over the target; on any failure the
temporary file goes and the target is untouched. Temporaries left by a killed process are removed
when the next run starts in the folder. Checkpoints hold only tensors and plain Python values and
are read with ``weights_only=True``, so loading one never runs arbitrary code.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "guide", "optimizer", "epoch", "step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, or not a bayesdyn checkpoint."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. A full disk raises ``OSError`` (ENOSPC) with a
    message naming the path and saying that the previous file, if any, is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OSError(err.errno, f"no space left on the device writing {path}; {kept}. "
                                     "Free some space and run the command again") from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (serialised in memory first, so a full disk
    is an ``OSError`` here, never a torn file or an error from inside the zip writer)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def read_json(path: str | os.PathLike) -> dict:
    """Read a run's JSON file; a truncated or edited one is an error that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file (corrupt?)") from err


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A bayesdyn checkpoint, read with ``weights_only=True``; anything else (corrupt, empty,
    truncated, another program's file, a pickled object) is a ``CheckpointError`` and nothing in
    it is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    broken = f"{path.name} in {path.parent} is corrupt or not a bayesdyn checkpoint"
    with open(path, "rb") as fh:  # a permission error surfaces here, as itself
        fh.read(1)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile,
            KeyError, IndexError, AttributeError, OSError) as err:
        # torch's own message would suggest weights_only=False: never advise unsafe loading
        raise CheckpointError(f"{broken} ({type(err).__name__}); start a new run with another "
                              "--out, or restore the file from a backup") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{broken} (it lacks the model, guide and optimizer states)")
    return ckpt


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files that processes no longer running left in ``folder`` (a
    ``kill -9`` during a write); returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
