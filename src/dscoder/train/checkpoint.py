"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

``RUN/checkpoints/step-000123/`` holds the DCP files of the model and optimizer (sharded as the run was: FSDP2
shards and expert-parallel expert shards are saved by their owners), ``rank-00000.json`` ... (each rank's loader
position and RNG states), ``meta.json`` (step, world size, model config) and ``manifest.json`` (the size and sha256
of every other file). Everything is first written to ``step-000123.tmp/`` and renamed once every rank has finished
and the manifest is written, so a directory without the ``.tmp`` suffix is complete when written; a cut-off write
leaves only a ``.tmp`` directory, which is ignored (and removed by the next save).

Files can still be damaged afterwards (a disk, a copy, a stray write). :func:`verify` checks a checkpoint against
its manifest; :func:`latest_intact` is what ``--resume`` loads: the newest checkpoint that verifies, with a one-line
warning for each newer one that does not. Pruning (``keep_checkpoints``) counts only checkpoints whose files are all
present with their recorded sizes, so a damaged checkpoint never displaces a good one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from dscoder.errors import CheckpointError
from dscoder.io import write_json

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
REQUIRED = (".metadata", "meta.json")  # DCP's index of the tensors, and ours


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": base64.b64encode(json.dumps(random.getstate(), default=list).encode()).decode(),
             "numpy": _numpy_state(),
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _numpy_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run (``step-N``, not ``.tmp``), oldest first; :func:`verify` tells which
    are intact."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ----- integrity -------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _my_share(names: list[str]) -> list[str]:
    """The files this rank hashes: every world-th one, so the ranks share the reading."""
    return names[_rank()::_world()]


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _write_manifest(directory: Path) -> None:
    """Collectively: size and sha256 of every file in ``directory`` into ``manifest.json`` (written by rank 0)."""
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in _my_share(names)}
    files = {k: v for part in _gather(mine) for k, v in part.items()}
    missing = [name for name in REQUIRED if name not in files]  # the same on every rank
    if missing:
        raise CheckpointError(f"{directory}: the save did not write {missing[0]}")
    if _rank() == 0:
        write_json(directory / MANIFEST, {"format": "dscoder-checkpoint", "algorithm": "sha256",
                                          "files": dict(sorted(files.items()))})


def verify(path: Path, deep: bool = True) -> str | None:
    """None if the checkpoint at ``path`` matches its manifest, else what is wrong (one phrase). ``deep`` compares
    every file's sha256 (collectively: each rank reads a share); otherwise only presence and sizes are checked."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError
    except FileNotFoundError:  # saved before checkpoints carried a manifest: only what it must hold is checked
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    problems = []
    for name, want in files.items():
        p = path / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, {want['bytes']} were written")
    if problems:
        return problems[0]
    if deep:
        names = sorted(files)
        bad = [name for name in _my_share(names) if _sha256(path / name) != files[name]["sha256"]]
        bad = sorted(b for part in _gather(bad) for b in part)
        if bad:
            return f"{bad[0]} does not match its checksum (its bytes changed after the save)"
    return None


def warn(message: str) -> None:
    """A one-line warning on stderr (rank 0 only)."""
    if _rank() == 0:
        print(f"dscoder: warning: {message}", file=sys.stderr, flush=True)


def latest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that :func:`verify` accepts (collectively), warning in one line about
    each newer one that it skips; None if the run has no checkpoint; a :class:`CheckpointError` if none is intact."""
    found = checkpoints(run_dir)
    first_problem = None
    for path in reversed(found):
        problem = verify(path)
        if problem is None:
            if not (path / MANIFEST).is_file():
                warn(f"{path}: written without a {MANIFEST} (by an older dscoder); resuming from it unverified")
            return path
        first_problem = first_problem or f"{path.name}: {problem}"
        warn(f"{path}: damaged ({problem}); skipping it for an earlier checkpoint")
    if found:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no intact checkpoint to resume from "
                              f"({first_problem}); start a new --out")
    return None


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C during a save takes effect once the save is complete: DCP turns a KeyboardInterrupt raised inside its
    writers into its own CheckpointException (a traceback instead of a clean stop, and a half-written step)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint collectively (every rank calls this); a Ctrl-C meanwhile stops the run after the save."""
    with _interrupts_deferred():
        return _save(run_dir, step, model, optimizer, extra, meta, keep)


def _save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          extra: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that a single process saves without a process group: intended
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    write_json(tmp / f"rank-{_rank():05d}.json", {**extra, "rng": rng_state()}, indent=1)
    _barrier()
    if _rank() == 0:
        write_json(tmp / "meta.json", {**meta, "step": step, "world_size": _world()}, indent=1)
    _barrier()
    _write_manifest(tmp)
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(run_dir, keep)
        for stale in root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints whose files are all there (sizes checked) and remove the ones older
    than them; a damaged checkpoint is never counted, so it cannot push a good one out."""
    found = checkpoints(run_dir)
    intact = [p for p in found if verify(p, deep=False) is None][-keep:]
    if len(intact) < keep:
        return
    oldest_kept = found.index(intact[0])
    for old in found[:oldest_kept]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a complete dscoder training checkpoint (no readable meta.json)") from None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place, collectively; returns this rank's extra state (RNG restored)."""
    path = Path(path)
    meta = read_meta(path)
    if meta["world_size"] != _world():
        raise CheckpointError(f"{path}: saved by {meta['world_size']} processes; resume with the same number "
                              f"(this run has {_world()})")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, path)
        model.load_state_dict(state["model"])
    try:
        extra = json.loads((path / f"rank-{_rank():05d}.json").read_text())
        set_rng_state(extra.pop("rng"))
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: rank-{_rank():05d}.json is missing or unreadable") from None
    return extra


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Single process: the model weights of a checkpoint into a plain (unsharded) model, e.g. for export."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])


def _dcp_load(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP wraps shape/key mismatches and unreadable files in its own errors
            raise CheckpointError(f"{path}: cannot load this checkpoint ({str(e).splitlines()[0][:200]})") from None
