"""`dscoder data build --executor ray` on a local Ray instance gives the corpus `--executor local` gives."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from data_corpus import make_corpus
from dscoder.cli import main
from dscoder.data.pipeline import BuildConfig, build
from dscoder.errors import DscoderError

pytest.importorskip("ray")


def _files(out: Path) -> dict[str, bytes]:
    """The build's outputs that must not depend on the executor (gzip members unpacked: their headers hold no
    time, but compare contents anyway)."""
    files = {}
    for sub in ("tokens", "documents", "rejected", "tokenizer"):
        for f in sorted((out / sub).iterdir()):
            data = f.read_bytes()
            files[f"{sub}/{f.name}"] = gzip.decompress(data) if f.name.endswith(".gz") else data
    return files


def test_ray_build_equals_the_local_build(tmp_path):
    make_corpus(tmp_path / "src")
    made = {}
    for executor in ("ray", "local"):
        config = BuildConfig(sources=[str(tmp_path / "src")], out=str(tmp_path / executor), tasks=2, vocab_size=600)
        try:
            made[executor] = build(config, executor=executor, workers=2)
        except DscoderError as e:
            if executor == "ray" and "could not start or reach" in str(e):
                pytest.skip(f"Ray cannot start here: {e}")
            raise
    assert made["ray"] == made["local"] and made["ray"]["documents_kept"] > 5
    ray_files, local_files = _files(tmp_path / "ray"), _files(tmp_path / "local")
    assert ray_files.keys() == local_files.keys() and "tokens/00001.bin" in ray_files
    assert ray_files == local_files
    # every task of every stage left its completion marker (a rerun resumes nothing)
    assert len(list((tmp_path / "ray" / "logs" / "filter" / "completions").iterdir())) == 2


def test_ray_address_needs_the_ray_executor(tmp_path, capsys):
    make_corpus(tmp_path / "src")
    code = main(["data", "build", str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--ray-address", "head:6379"])
    assert code != 0
    assert_one_line_error(capsys.readouterr().err, "--ray-address is for --executor ray")
