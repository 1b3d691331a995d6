"""dscoder.io: the one atomic writer and the one jsonl reader."""

import gzip
import os

import pytest

from dscoder.errors import DscoderError
from dscoder.io import atomic_path, atomic_write, iter_jsonl, read_jsonl, write_json


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"b": "\xff"}\n')
    with pytest.raises(DscoderError, match=r"a\.jsonl:3: not valid UTF-8"):
        list(iter_jsonl(p))
    p.write_bytes(b'{"a": 1}\n{"b": \n')
    with pytest.raises(DscoderError, match=r"a\.jsonl:2: not valid JSON"):
        list(iter_jsonl(p))
    with pytest.raises(DscoderError, match="no such samples file"):
        list(iter_jsonl(tmp_path / "missing.jsonl", "samples"))
    p.write_text("\n")
    with pytest.raises(DscoderError, match="no jsonl in this file"):
        read_jsonl(p)
    assert read_jsonl(p, allow_empty=True) == []


def test_gzip_jsonl_and_truncation(tmp_path):
    g = tmp_path / "a.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert read_jsonl(g) == [(1, {"a": 1}), (2, {"a": 2})]
    g.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-20])
    with pytest.raises(DscoderError, match="truncated or corrupt gzip"):
        list(iter_jsonl(g))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "out" / "x.json"
    write_json(p, {"v": 1})
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(p.parent) == ["x.json"]  # no temporary left behind
    with pytest.raises(DscoderError, match="is a directory"):
        write_json(tmp_path / "out", {})


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
    """numpy and safetensors write to a name: they get a temporary one, renamed over the target only on success."""
    np = pytest.importorskip("numpy")
    target = tmp_path / "sigs" / "00001.npz"
    with atomic_path(target, suffix=".npz") as tmp:  # savez appends .npz to a name that lacks it
        assert tmp.parent == target.parent and not target.exists()
        np.savez(tmp, a=np.arange(3))
    assert np.load(target)["a"].tolist() == [0, 1, 2] and oct(target.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".npz") as tmp:
            np.savez(tmp, a=np.arange(5))
            raise RuntimeError("killed mid-write")
    assert np.load(target)["a"].tolist() == [0, 1, 2] and os.listdir(target.parent) == ["00001.npz"]
