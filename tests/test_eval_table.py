"""The benchmark cache (`dscoder eval fetch`: hash verification, lookups, the line that names the fetch command) and
`dscoder eval table` (markdown and PNG with the paper's figures beside the measured ones)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, samples_file, write_lines
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval import fetch as fetch_module
from dscoder.eval.fetch import BENCHMARKS, Benchmark, cached_files, fetch
from dscoder.eval.run import evaluate
from dscoder.eval.table import FULL, LITE, table_rows

ROW = {"task_id": "HumanEval/0", "prompt": "def one():\n", "entry_point": "one", "canonical_solution": "    return 1\n",
       "base_input": [[]], "plus_input": [[]], "atol": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSCODER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "benchmarks"


def _fake_hub(content: bytes, name="HumanEvalPlus.jsonl"):
    def download(bench, folder: Path):
        (folder / "data").mkdir()
        (folder / "data" / name).write_bytes(content)
        (folder / "README.md").write_text("not a data file")
    return download


def test_a_missing_benchmark_names_the_fetch_command(cache, tmp_path, capsys):
    samples = samples_file(tmp_path / "s.jsonl", [("HumanEval/0", "    return 1\n")])
    assert main(["eval", "humaneval+", "--samples", str(samples), "--out", str(tmp_path / "o")]) != 0
    assert_one_line_error(capsys.readouterr().err, "not in the cache", "dscoder eval fetch humaneval+", "--problems")


def test_fetch_verifies_the_pinned_hash_and_tasks_find_the_file(cache, tmp_path, monkeypatch):
    content = (json.dumps(ROW) + "\n").encode()
    digest = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(BENCHMARKS, "humaneval+", Benchmark("HE+", "evalplus/humanevalplus", ("*.jsonl",),
                                                            pins={"data/HumanEvalPlus.jsonl": digest}))
    # a download whose bytes are not the pinned ones is refused, and nothing reaches the cache
    with pytest.raises(DscoderError, match="is not the pinned"):
        fetch("humaneval+", download=_fake_hub(content + b"\n"))
    assert not (cache / "humaneval+").exists()
    files = fetch("humaneval+", download=_fake_hub(content))
    assert files == [cache / "humaneval+" / "data" / "HumanEvalPlus.jsonl"] and cached_files("humaneval+") == files
    # the task reads it from the cache when no --problems is given
    samples = samples_file(tmp_path / "s.jsonl", [("HumanEval/0", "    return 1\n")])
    assert evaluate("humaneval+", tmp_path / "o", samples=samples, min_time_limit=0.5)["pass@1"] == 1.0
    # a file changed after the fetch is refused at lookup
    files[0].write_bytes(content.replace(b"return 1", b"return 2"))
    with pytest.raises(DscoderError, match="does not match the pinned"):
        cached_files("humaneval+")


def test_an_unpinned_file_is_recorded_on_first_fetch(cache, monkeypatch, capsys):
    monkeypatch.setitem(BENCHMARKS, "math", Benchmark("MATH", "x/y", ("*.jsonl",)))
    files = fetch("math", download=_fake_hub(b'{"problem": "1+1", "answer": "2"}\n', "test.jsonl"))
    assert "trust on first use" in capsys.readouterr().out
    record = json.loads((cache / "math" / fetch_module.RECORD).read_text())
    assert record == {"data/test.jsonl": hashlib.sha256(files[0].read_bytes()).hexdigest()}
    files[0].write_bytes(b"{}\n")
    with pytest.raises(DscoderError, match="does not match"):
        cached_files("math")


def test_fetch_cli_errors_are_one_line(cache, capsys):
    assert main(["eval", "fetch", "cobol"]) != 0
    assert_one_line_error(capsys.readouterr().err, "unknown benchmark 'cobol'")
    assert main(["eval", "fetch"]) != 0
    assert_one_line_error(capsys.readouterr().err, "name a benchmark")


def _run(path: Path, summary: dict) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_the_table_puts_the_papers_figures_beside_the_measured_ones(tmp_path, capsys):
    lcb = _run(tmp_path / "lcb", {"task": "livecodebench", "pass@1": 0.25, "difficulties": {
        "easy": {"problems": 2, "pass@1": 0.5}, "hard": {"problems": 2, "pass@1": 0.0}}})
    he = _run(tmp_path / "he", {"task": "humaneval", "pass@1": 0.9})
    gsm = _run(tmp_path / "gsm", {"task": "gsm8k", "exact_match": 0.5})
    hep = _run(tmp_path / "hep", {"task": "humaneval+", "pass@1": 0.8, "base_pass@1": 0.85})
    rows = table_rows([lcb, he, gsm, hep])
    assert [(r["task"], r["measured"], r[LITE], r[FULL]) for r in rows] == [
        ("humaneval", 90.0, 81.1, 90.2), ("humaneval+", 80.0, None, None), ("livecodebench", 25.0, 24.3, 43.4),
        ("livecodebench/easy", 50.0, 58.5, 84.1), ("livecodebench/hard", 0.0, 0.0, 5.3), ("gsm8k", 50.0, 86.4, 94.9)]
    assert main(["eval", "table", str(lcb), str(he), str(gsm), str(hep), "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| livecodebench | lcb | 25.0 | 24.3 | 43.4 |" in md and "| humaneval+ | hep | 80.0 | - | - |" in md
    assert (tmp_path / "t" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["eval", "table", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")]) != 0
    assert_one_line_error(capsys.readouterr().err, "not a dscoder eval output folder")
    assert main(["eval", "table", str(lcb)]) != 0
    assert_one_line_error(capsys.readouterr().err, "--out")


def test_a_real_eval_run_goes_into_the_table(tmp_path):
    problems = write_lines(tmp_path / "p.jsonl", [ROW])
    samples = samples_file(tmp_path / "s.jsonl", [("HumanEval/0", "    return 1\n")])
    evaluate("humaneval+", tmp_path / "run", samples=samples, problems=str(problems), min_time_limit=0.5)
    assert [(r["task"], r["measured"]) for r in table_rows([tmp_path / "run"])] == [("humaneval+", 100.0)]
