"""Helpers shared by the test files: tiny models whose logits are O(1), a tiny checkpoint with its tokenizer, and
the one-line error check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dscoder
from dscoder.tokenizer import Tokenizer

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One :func:`make_checkpoint` for the whole session (read-only: copy it before changing anything)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def assert_one_line_error(text: str, *needles: str) -> None:
    """``text`` (a CLI's stderr or stdout) is one line, no traceback, mentioning each of ``needles``."""
    assert text.count("\n") == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
