"""An anneal: function-level documents cut out of a build (`dscoder data functions`), read by a run for its last steps
(data.anneal_path, data.anneal_fraction) with the schedule going on, resumable exactly on either side of the switch."""

from __future__ import annotations

import ast
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import assert_one_line_error, jsonl_rows, write_lines
from dscoder.cli import main
from dscoder.data.functions import functions
from dscoder.errors import ConfigError, DscoderError
from dscoder.train.config import TrainConfig
from dscoder.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]

SOURCE = textwrap.dedent('''\
    import os

    def documented(a, b=1):
        """Add."""
        return a + b

    def undocumented(x):
        return x

    def only_a_docstring():
        """Nothing else."""

    @staticmethod
    def decorated(path):
        """Exists."""
        return os.path.exists(path)

    class Box:
        def get(self, key):
            """The value."""
            if key:
                return self.values[key]
            return None

        def raw(self):
            """A string less indented than its code: the method does not parse alone."""
            return """a string
    at column 0"""

    def long(x):
        """Long."""
''') + "    x += 1\n" * 40 + "    return x\n"


def test_functions_are_dedented_documents_with_a_docstring_and_a_body():
    found = {name: (line, text) for name, line, text in functions(SOURCE)}
    assert set(found) == {"documented", "decorated", "get"}  # not: no docstring, no body, too long, "raw"
    assert found["documented"] == (3, 'def documented(a, b=1):\n    """Add."""\n    return a + b\n')
    assert found["decorated"][1].startswith("def decorated(path):\n")  # without its decorator
    line, text = found["get"]
    assert line == 19 and text.startswith("def get(self, key):\n    \"\"\"The value.\"\"\"\n    if key:\n")
    ast.parse(text)
    assert {name for name, *_ in functions(SOURCE, max_lines=60)} == {"documented", "decorated", "get", "long"}
    assert list(functions("def broken(:\n")) == []


def test_data_functions_cli_and_its_bad_input(stdlib_build, tmp_path, capsys):
    out = tmp_path / "functions.jsonl"
    assert main(["data", "functions", str(stdlib_build), "--out", str(out)]) == 0
    assert "functions" in capsys.readouterr().out
    rows = jsonl_rows(out)
    assert len(rows) > 50
    for row in rows:
        tree = ast.parse(row["text"])
        assert isinstance(tree.body[0], ast.FunctionDef) and ast.get_docstring(tree.body[0]) is not None
        assert row["path"].endswith(".py") and "/" in row["path"]
    plain = write_lines(tmp_path / "docs.jsonl", [{"text": SOURCE, "path": "pkg/mod.py"}, {"text": "x = 1\n"},
                                                  {"text": "def f():\n    'doc'\n    return 1\n", "path": "a.txt"}])
    assert main(["data", "functions", str(plain), "--out", str(tmp_path / "f2.jsonl")]) == 0
    assert [r["path"] for r in jsonl_rows(tmp_path / "f2.jsonl")] == ["pkg/mod/documented_3.py", "pkg/mod/decorated_14.py",
                                                                     "pkg/mod/get_19.py"]
    capsys.readouterr()
    for args, needle in [([str(tmp_path / "missing")], "no such file"), ([str(tmp_path)], "documents/"),
                         ([str(write_lines(tmp_path / "bad.jsonl", [b"{"]))], "bad.jsonl:1"),
                         ([str(write_lines(tmp_path / "notext.jsonl", [{"path": "a.py"}]))], "without a \"text\""),
                         ([str(plain), "--max-lines", "1"], "--max-lines")]:
        assert main(["data", "functions", *args, "--out", str(tmp_path / "x.jsonl")]) == 2
        assert_one_line_error(capsys.readouterr().err, needle)


@pytest.fixture(scope="module")
def anneal_build(stdlib_build, tmp_path_factory):
    """The functions of the small stdlib build, built with its tokenizer."""
    root = tmp_path_factory.mktemp("anneal")
    assert main(["data", "functions", str(stdlib_build), "--out", str(root / "functions.jsonl")]) == 0
    assert main(["data", "build", str(root / "functions.jsonl"), "--tokenizer", str(stdlib_build / "tokenizer"),
                 "--no-dedup", "--no-humaneval", "--tasks", "1", "--workers", "1", "--out", str(root / "build")]) == 0
    assert json.loads((root / "build" / "manifest.json").read_text())["documents_kept"] > 50
    return root / "build"


def _config(data_dir, *overrides):
    return TrainConfig.load(ROOT / "configs" / "tiny.toml",
                            [f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=4", "train.steps=8",
                             "train.warmup_steps=2", "train.ckpt_every=2", "train.keep_checkpoints=8", *overrides])


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in jsonl_rows(run / "metrics.jsonl")]


def test_anneal_reads_its_build_for_the_last_steps_and_resumes_exactly(stdlib_build, anneal_build, tmp_path,
                                                                       monkeypatch):
    import dscoder.train.pretrain as pt

    built = []
    make_loader = pt.make_loader

    def spy(config, stage, tokenizer, d, anneal=False):
        loader = make_loader(config, stage, tokenizer, d, anneal)
        built.append((anneal, [s.path for s in loader.sources]))
        return loader

    monkeypatch.setattr(pt, "make_loader", spy)
    plain = _config(stdlib_build)
    cfg = _config(stdlib_build, f"data.anneal_path={anneal_build}", "data.anneal_fraction=0.5")
    assert cfg.anneal_start == 4
    pretrain(plain, tmp_path / "plain")
    built.clear()
    pretrain(cfg, tmp_path / "full")
    assert built == [(False, [Path(stdlib_build)]), (True, [Path(anneal_build)])]
    rows = jsonl_rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["anneal"] for r in rows] == [False] * 4 + [True] * 4
    assert [r["lr"] for r in rows] == [r["lr"] for r in jsonl_rows(tmp_path / "plain" / "metrics.jsonl")]
    full, other = _losses(tmp_path / "full"), _losses(tmp_path / "plain")
    assert full[:4] == other[:4] and all(a != b for a, b in zip(full[4:], other[4:]))  # other batches from step 5
    for cut in (4, 6):  # saved before the switch (the anneal starts on resume), and in the anneal (its position kept)
        pretrain(cfg, tmp_path / f"cut{cut}", max_steps=cut)
        pretrain(cfg, tmp_path / f"cut{cut}", resume=True)
        assert _losses(tmp_path / f"cut{cut}") == full  # bitwise, fp32 on CPU
    pretrain(cfg, tmp_path / "late", max_steps=6)
    later = _config(stdlib_build, f"data.anneal_path={anneal_build}", "data.anneal_fraction=0.125")
    with pytest.raises(DscoderError, match="saved during the anneal, which this recipe starts at step 7"):
        pretrain(later, tmp_path / "late", resume=True)


def test_anneal_settings_are_checked(stdlib_build, anneal_build, tmp_path):
    with pytest.raises(ConfigError, match="data.anneal_fraction"):
        _config(stdlib_build, f"data.anneal_path={stdlib_build}")
    with pytest.raises(ConfigError, match="data.anneal_fraction"):
        _config(stdlib_build, "data.anneal_fraction=0.5")
    with pytest.raises(ConfigError, match="data.anneal_fraction"):
        _config(stdlib_build, f"data.anneal_path={stdlib_build}", "data.anneal_fraction=1.0")
    with pytest.raises(DscoderError, match="not a `dscoder data build` output"):
        pretrain(_config(stdlib_build, f"data.anneal_path={tmp_path}", "data.anneal_fraction=0.5"), tmp_path / "r")
    other = tmp_path / "other"  # the anneal's build with another tokenizer: its ids would mean other strings
    shutil.copytree(anneal_build, other)
    (other / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(DscoderError, match="made with another tokenizer"):
        pretrain(_config(stdlib_build, f"data.anneal_path={other}", "data.anneal_fraction=0.5"), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()
