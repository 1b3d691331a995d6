"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

``RUN/checkpoints/step-000123/`` holds the DCP files of the model and optimizer (sharded as the run was: FSDP2
shards and expert-parallel expert shards are saved by their owners), ``rank-00000.json`` ... (each rank's loader
position and RNG states) and ``meta.json`` (step, world size, model config). Everything is first written to ``step-000123.tmp/`` and renamed
once every rank has finished, so a directory without the ``.tmp`` suffix is always complete; a cut-off write
leaves only a ``.tmp`` directory, which is ignored (and removed by the next save).
"""

from __future__ import annotations

import base64
import json
import warnings
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from dscoder.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").exists()]
    return [p for _, p in sorted(found)]


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint collectively (every rank calls this)."""
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
    _write_json(tmp / f"rank-{_rank():05d}.json", {**extra, "rng": rng_state()})
    _barrier()
    if _rank() == 0:
        _write_json(tmp / "meta.json", {**meta, "step": step, "world_size": _world()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


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
    extra = json.loads((path / f"rank-{_rank():05d}.json").read_text())
    set_rng_state(extra.pop("rng"))
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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
