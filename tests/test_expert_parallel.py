"""Expert parallelism: torchrun with parallel.ep=2 matches one process, resumes exactly, exports a full model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import jsonl_rows, torchrun
from dscoder.cli import main
from dscoder.errors import ConfigError
from dscoder.train.config import TrainConfig
from dscoder.train.expert_parallel import check
from dscoder.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # a checkpoint at 4 and at 8: the resume test restarts from 4


@pytest.fixture(scope="module")
def data_dir(stdlib_build):
    return stdlib_build


def _common(data_dir) -> list[str]:
    return [f"data.path={data_dir}", "data.seq_len=64", "data.shard=rows", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.ckpt_every=4", "train.log_every=1"]


def _torchrun(data_dir, out: Path, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    return torchrun("train", "pretrain", "--config", "tiny", "--out", str(out), *(["--resume"] if resume else []),
                    *_common(data_dir), "train.micro_batch=2", "parallel.strategy=ddp", "parallel.ep=2", *extra)


def _rows(run: Path) -> list[dict]:
    return jsonl_rows(run / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One process with a global batch of 4 rows, and 2 ranks x 2 rows with the 8 routed experts split 4 + 4."""
    root = tmp_path_factory.mktemp("ep-runs")
    pretrain(TrainConfig.load(ROOT / "configs" / "tiny.toml", [*_common(data_dir), "train.micro_batch=4"]),
             root / "one")
    proc = _torchrun(data_dir, root / "ep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one", root / "ep"


def test_ep_matches_one_process(runs):
    one, ep = (_rows(r) for r in runs)
    assert len(one) == len(ep) == STEPS
    # the same global batch: only float summation order differs. grad_norm checks the expert-gradient scaling
    # (a missing 1/world or a missing sum over ranks changes the global norm, and clipping with it)
    for key in ("loss", "aux_loss", "grad_norm"):
        assert max(abs(a[key] - b[key]) for a, b in zip(one, ep)) < 1e-4, (key, one, ep)
    assert ep[-1]["loss"] < ep[0]["loss"]


def test_ep_checkpoint_holds_every_ranks_experts(runs):
    """The routed experts are DTensors sharded over "ep": DCP records one chunk per rank, not one replicated tensor."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(runs[1] / "checkpoints" / "step-000008")).read_metadata()
    for key in ("model.model.layers.1.mlp.experts.gate_up_proj",
                "optim.state.model.layers.1.mlp.experts.down_proj.exp_avg"):
        entry = meta.state_dict_metadata[key]
        assert entry.size[0] == 8, (key, entry.size)
        assert sorted((c.offsets[0], c.sizes[0]) for c in entry.chunks) == [(0, 4), (4, 4)], entry.chunks


def test_ep_resume_is_exact(runs, data_dir, tmp_path):
    full = runs[1]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000008")  # as if killed right after the step-4 checkpoint
    proc = _torchrun(data_dir, cut, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank reloads its own experts and optimizer moments: the continuation equals the uninterrupted run
    assert [r["loss"] for r in _rows(cut)] == [r["loss"] for r in _rows(full)]


def test_ep_export_is_the_full_model(runs, tmp_path):
    import dscoder

    for name, run in zip(("one", "ep"), runs):
        assert main(["export", str(run), "--out", str(tmp_path / name)]) == 0
    one, ep = dscoder.load_model(tmp_path / "one"), dscoder.load_model(tmp_path / "ep")
    sd_one, sd_ep = one.state_dict(), ep.state_dict()
    assert sd_ep["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 8
    assert sd_one.keys() == sd_ep.keys()
    worst = max((sd_one[k] - sd_ep[k]).abs().max().item() for k in sd_one)
    assert worst < 1e-4, worst  # rank 1's experts included: stale or missing rows would differ by ~lr per step
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (one(ids).logits - ep(ids).logits).abs().max().item() < 1e-4


def test_ep_config_errors(data_dir, tmp_path, capsys):
    def cfg(*overrides):
        return TrainConfig.load(ROOT / "configs" / "tiny.toml", [f"data.path={data_dir}", *overrides])

    with pytest.raises(ConfigError, match="parallel.ep: expected a positive integer"):
        cfg("parallel.ep=0")
    with pytest.raises(ConfigError, match="needs parallel.strategy = 'ddp' or 'fsdp'"):
        cfg("parallel.ep=2", "parallel.strategy=none")
    with pytest.raises(ConfigError, match="needs torchrun with a multiple of 2 processes"):
        pretrain(cfg("parallel.ep=2", "train.steps=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="must divide the number of processes \\(2\\)"):
        check(3, 2, 8)
    with pytest.raises(ConfigError, match="must divide the model's n_routed_experts \\(6\\)"):
        check(4, 4, 6)
    check(2, 4, 8)
    assert main(["train", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--out",
                 str(tmp_path / "r"), f"data.path={data_dir}", "parallel.ep=2", "parallel.strategy=fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parallel.ep" in err, err
