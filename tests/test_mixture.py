"""The paper's mixture in a run: named builds with token weights (code 0.6, math 0.1, text 0.3), documents of very
different lengths per source, and the token share each source received logged within a percent of its weight,
the same after a resume; the coder-v2-lite recipe names the three builds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import jsonl_rows
from dscoder.data.shards import ShardWriter
from dscoder.errors import ConfigError, DscoderError
from dscoder.tokenizer import Tokenizer
from dscoder.train.config import TrainConfig
from dscoder.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"code": "def return self import for in if else x y".split(),
         "math": "theorem proof integral derivative = + x^2 prime sum limit".split(),
         "text": "the city market weather music garden holiday train coffee".split()}
LENGTHS = {"code": (2, 5), "math": (12, 20), "text": (5, 10)}  # words per document: shares by documents would miss


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    rng = random.Random(0)
    docs = {name: [" ".join(rng.choice(words) for _ in range(rng.randint(*LENGTHS[name]))) for _ in range(60)]
            for name, words in WORDS.items()}
    tok = Tokenizer.train([d for ds in docs.values() for d in ds], vocab_size=300)
    for name, texts in docs.items():
        tok.save(root / name / "tokenizer")
        with ShardWriter(root / name / "tokens", "00000") as writer:
            for t in texts:
                writer.add(tok.encode(t))
    return root


def _config(root, *overrides):
    sources = ", ".join(f'{{name = "{n}", path = "{root / n}", weight = {w}}}'
                        for n, w in (("code", 0.6), ("math", 0.1), ("text", 0.3)))
    return TrainConfig.load(ROOT / "configs" / "tiny.toml", [
        f"data.sources=[{sources}]", "data.path=", "data.seq_len=64", "train.micro_batch=4", "train.steps=16",
        "train.warmup_steps=2", "train.ckpt_every=8", "train.log_every=1", *overrides])


def test_token_shares_follow_the_weights_and_survive_resume(mixture, tmp_path):
    cfg = _config(mixture)
    pretrain(cfg, tmp_path / "full")
    rows = jsonl_rows(tmp_path / "full" / "metrics.jsonl")
    shares = rows[-1]["data_shares"]
    assert set(shares) == {"code", "math", "text"}
    for name, weight in (("code", 0.6), ("math", 0.1), ("text", 0.3)):
        assert abs(shares[name] - weight) < 0.01, shares
    pretrain(cfg, tmp_path / "cut", max_steps=8)
    pretrain(cfg, tmp_path / "cut", resume=True)
    assert jsonl_rows(tmp_path / "cut" / "metrics.jsonl")[-1]["data_shares"] == shares


def test_mixture_errors(mixture, tmp_path):
    other = tmp_path / "other"
    Tokenizer.train(["something else entirely"] * 20, vocab_size=270).save(other / "tokenizer")
    (other / "tokens").mkdir()
    cfg = _config(mixture, f'data.sources=[{{path = "{mixture / "code"}"}}, {{path = "{other}"}}]')
    with pytest.raises(DscoderError, match="another tokenizer"):
        pretrain(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="name"):
        _config(mixture, f'data.sources=[{{path = "{mixture / "code"}", name = 3}}]')


def test_coder_v2_lite_recipe_names_the_papers_mixture():
    sources = TrainConfig.load("coder-v2-lite").data.sources
    assert {s["name"]: s["weight"] for s in sources} == {"code": 0.6, "math": 0.1, "text": 0.3}
