"""Quickstart pieces (the full run takes minutes: it is run by hand and by `make quickstart`)."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import pytest

import dscoder
from conftest import untrained_checkpoint
from dscoder.cli import main
from dscoder.data.sources import default_sources, iter_documents
from dscoder.errors import DscoderError
from dscoder.quickstart import held_out_files, perplexity, quickstart
from dscoder.tokenizer import Tokenizer


def test_held_out_files_are_outside_the_corpus():
    """No held-out file's bytes are among the documents the data stage reads (checked against those documents, so a
    held-out choice or a corpus walk that lets one in fails here)."""
    files = held_out_files()
    assert len(files) >= 10 and len({f.read_bytes() for f in files}) == len(files)
    corpus = {hashlib.sha256(d.content).digest() for d in iter_documents(default_sources())
              if isinstance(d.content, bytes)}
    assert len(corpus) > 1000  # the standard library was read
    leaked = [f for f in files if hashlib.sha256(f.read_bytes()).digest() in corpus]
    assert not leaked
    stdlib_file = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"  # the check sees a file that is in it
    assert hashlib.sha256(stdlib_file.read_bytes()).digest() in corpus


def test_perplexity_of_a_random_model_is_about_the_vocabulary(tmp_path):
    files = held_out_files()[:3]
    untrained_checkpoint(tmp_path, [f.read_text() for f in held_out_files()])
    vocab = Tokenizer.load(tmp_path).vocab_size
    ppl = perplexity(tmp_path, files, seq_len=64)
    assert 0.5 * vocab < ppl < 2 * vocab  # an untrained model is close to uniform


def test_bad_arguments_and_missing_stages(tmp_path, capsys):
    with pytest.raises(DscoderError, match="--minutes must be at least 3"):
        quickstart(tmp_path, minutes=1)
    with pytest.raises(DscoderError, match="run the 'data' stage first"):
        quickstart(tmp_path, stage="pretrain")
    assert main(["quickstart", "--out", str(tmp_path), "--stage", "eval"]) == 2
    assert "run the 'export' stage first" in capsys.readouterr().err
    with pytest.raises(DscoderError, match="--mbpp .*nowhere.jsonl: no such file"):
        quickstart(tmp_path, mbpp=tmp_path / "nowhere.jsonl")


def test_out_that_is_not_a_quickstart_is_left_alone(tmp_path, capsys):
    """--out a file, --stage over a folder that is not a quickstart's (it would delete the user's data/), a
    garbage timings.json, --minutes nan: one line each, nothing deleted."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "notes.txt").write_text("mine")
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "timings.json").write_text("{")
    for argv, says in [(["--out", str(tmp_path / "file")], "is a file"),
                       (["--out", str(tmp_path / "proj"), "--stage", "data"], "not a quickstart folder"),
                       (["--out", str(tmp_path / "qs"), "--stage", "report"], "timings.json: unreadable"),
                       (["--out", str(tmp_path / "qs"), "--minutes", "nan"], "--minutes must be at least 3")]:
        assert main(["quickstart", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dscoder: error: ") and says in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "proj" / "data" / "notes.txt").exists()


def test_quickstart_reads_nothing_outside_the_package():
    """The recipe comes from package data and no path outside the project is spelled in the code."""
    import dscoder.quickstart as qs

    source = Path(qs.__file__).read_text()
    assert '"shared"' not in source and "../shared" not in source and "parents[" not in source
    assert (Path(dscoder.__file__).parent / "configs" / "tiny.toml").is_file()
