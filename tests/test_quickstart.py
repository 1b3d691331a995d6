"""Quickstart pieces (the full run takes minutes: it is run by hand and by `make quickstart`)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

import dscoder
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.quickstart import held_out_files, perplexity, quickstart
from dscoder.tokenizer import Tokenizer


def test_held_out_files_are_outside_the_corpus():
    files = held_out_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert len(files) >= 10
    assert not any(stdlib in p.resolve().parents and "site-packages" not in p.parts for p in files)


def test_perplexity_of_a_random_model_is_about_the_vocabulary(tmp_path):
    files = held_out_files()[:3]
    tok = Tokenizer.train([f.read_text() for f in held_out_files()], vocab_size=300)
    model = dscoder.build_model(dscoder.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size), seed=0)
    dscoder.save_model(model, tmp_path)
    tok.save(tmp_path)
    ppl = perplexity(tmp_path, files, seq_len=64)
    assert 0.5 * tok.vocab_size < ppl < 2 * tok.vocab_size  # an untrained model is close to uniform


def test_bad_arguments_and_missing_stages(tmp_path, capsys):
    with pytest.raises(DscoderError, match="--minutes must be at least 3"):
        quickstart(tmp_path, minutes=1)
    with pytest.raises(DscoderError, match="run the 'data' stage first"):
        quickstart(tmp_path, stage="pretrain")
    assert main(["quickstart", "--out", str(tmp_path), "--stage", "eval"]) == 2
    assert "run the 'export' stage first" in capsys.readouterr().err
