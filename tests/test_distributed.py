"""FSDP2 + expert parallelism over a ("dp", "ep") mesh: torchrun with 4 CPU ranks (dp 2 x ep 2) equals one process
in loss and gradient norm, its DCP checkpoint holds each weight's shards, resume is exact, export is the full model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import jsonl_rows, torchrun
from dscoder.cli import main
from dscoder.train.config import TrainConfig
from dscoder.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # checkpoints at 2 and 4: the resume test restarts from 2


def _common(data_dir) -> list[str]:
    return [f"data.path={data_dir}", "data.seq_len=64", "data.shard=rows", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.ckpt_every=2", "train.log_every=1"]


def _torchrun(data_dir, out: Path, *extra: str, resume: bool = False, nproc: int = 4) -> subprocess.CompletedProcess:
    return torchrun("train", "pretrain", "--config", "tiny", "--out", str(out), *(["--resume"] if resume else []),
                    *_common(data_dir), "train.micro_batch=1", "parallel.strategy=fsdp", "parallel.ep=2", *extra,
                    nproc=nproc)


@pytest.fixture(scope="module")
def runs(stdlib_build, tmp_path_factory):
    """One process with a global batch of 4 rows; 4 ranks x 1 row, the 8 routed experts split 4 + 4 over "ep",
    every other weight FSDP2-sharded over "dp" (2 ranks) and replicated over "ep"."""
    root = tmp_path_factory.mktemp("fsdp-ep")
    pretrain(TrainConfig.load(ROOT / "configs" / "tiny.toml", [*_common(stdlib_build), "train.micro_batch=4"]),
             root / "one")
    proc = _torchrun(stdlib_build, root / "fsdp_ep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one", root / "fsdp_ep"


def test_fsdp_ep_matches_one_process(runs):
    one, two = (jsonl_rows(r / "metrics.jsonl") for r in runs)
    assert len(one) == len(two) == STEPS
    # the same global batch: only float summation order differs. grad_norm checks the gradient scaling of both
    # halves (FSDP2's average over the world for the dense weights, 1/world and the sum over "dp" for the experts)
    for key in ("loss", "aux_loss", "grad_norm"):
        assert max(abs(a[key] - b[key]) for a, b in zip(one, two)) <= 1e-4, (key, one, two)
    assert two[-1]["loss"] < two[0]["loss"]


def test_fsdp_ep_checkpoint_shards(runs):
    """Experts: one chunk per "ep" rank; dense weights: one chunk per "dp" rank (FSDP2's Shard(0))."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(runs[1] / "checkpoints" / f"step-{STEPS:06d}")).read_metadata()
    chunks = {k: sorted((c.offsets[0], c.sizes[0]) for c in meta.state_dict_metadata[k].chunks) for k in
              ("model.model.layers.1.mlp.experts.gate_up_proj",
               "optim.state.model.layers.1.mlp.experts.down_proj.exp_avg",
               "model.model.layers.1.self_attn.o_proj.weight", "model.model.embed_tokens.weight")}
    assert chunks["model.model.layers.1.mlp.experts.gate_up_proj"] == [(0, 4), (4, 4)]
    assert chunks["optim.state.model.layers.1.mlp.experts.down_proj.exp_avg"] == [(0, 4), (4, 4)]
    assert chunks["model.model.layers.1.self_attn.o_proj.weight"] == [(0, 32), (32, 32)]
    assert chunks["model.model.embed_tokens.weight"] == [(0, 256), (256, 256)]


def test_fsdp_ep_resume_is_exact(runs, stdlib_build, tmp_path):
    full = runs[1]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:06d}")  # as if killed right after the step-2 checkpoint
    proc = _torchrun(stdlib_build, cut, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, want = jsonl_rows(cut / "metrics.jsonl"), jsonl_rows(full / "metrics.jsonl")
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(r["loss"], r["grad_norm"]) for r in want]


def test_fsdp_ep_export_is_the_full_model(runs, tmp_path):
    import dscoder

    for name, run in zip(("one", "two"), runs):
        assert main(["export", str(run), "--out", str(tmp_path / name)]) == 0
    one, two = dscoder.load_model(tmp_path / "one"), dscoder.load_model(tmp_path / "two")
    sd_one, sd_two = one.state_dict(), two.state_dict()
    assert sd_one.keys() == sd_two.keys() and sd_two["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 8
    assert max((sd_one[k] - sd_two[k]).abs().max().item() for k in sd_one) < 1e-4
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (one(ids).logits - two(ids).logits).abs().max().item() < 1e-4


def test_mesh_the_world_cannot_take_is_one_line(stdlib_build, tmp_path):
    """ep = 3 over 4 ranks: each rank says so in one line and nothing is written."""
    proc = _torchrun(stdlib_build, tmp_path / "r", "parallel.ep=3")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dscoder:")]
    message = "dscoder: error: parallel.ep = 3: must divide the number of processes (4)"
    # (the ranks share one stderr: should the OS splice two ranks' lines, each part is still the one message)
    assert lines and all(line.replace(message, "") == "" for line in lines), proc.stderr[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()
