"""`dscoder data build` end to end on a corpus with planted bad files; resume; bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_corpus import make_corpus
from dscoder.cli import main
from dscoder.data.pipeline import BuildConfig, build
from dscoder.data.shards import TokenDataset
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    bad, good = make_corpus(root / "src")
    out = root / "build"
    config = BuildConfig(sources=[str(root / "src")], out=str(out), tasks=3, vocab_size=600,
                         mbpp=str(MBPP) if MBPP.exists() else None)
    manifest = build(config, workers=1)
    return config, manifest, bad, good, out


def _rejected(out: Path) -> dict[str, dict]:
    rows = {}
    for f in sorted((out / "rejected").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                rows[row["path"].split("/", 1)[1]] = row
    return rows


def test_each_planted_file_is_rejected_by_its_rule(built):
    _, manifest, bad, good, out = built
    rejected = _rejected(out)
    got = {path: rejected.get(path, {}).get("rule") for path in bad}
    assert got == bad
    assert not (good & rejected.keys()), {p: rejected[p]["rule"] for p in good & rejected.keys()}
    assert ".git/config" not in rejected  # VCS folders are never read
    assert manifest["documents_in"] == len(bad) + len(good)
    assert manifest["documents_kept"] == len(good)
    assert sum(manifest["dropped"].values()) == len(bad)
    assert manifest["languages"]["Python"] == sum(p.endswith(".py") for p in good)
    assert (out / "data_stats.png").stat().st_size > 10_000


def test_tokens_decode_to_the_kept_documents(built):
    _, manifest, _, good, out = built
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.vocab_size == 600 and manifest["vocab_size"] == 600
    data = TokenDataset(out)
    assert len(data) == len(good) and data.n_tokens == manifest["tokens"]
    texts = []
    for f in sorted((out / "documents").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    assert [tok.decode(data[i].tolist()) for i in range(len(data))] == texts


def test_resume_redoes_only_missing_work(built, tmp_path):
    config, manifest, _, _, out = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    cfg = BuildConfig(**{**config.__dict__, "out": str(copy)})
    (copy / "build.json").write_text(json.dumps({**json.loads((copy / "build.json").read_text()), "out": str(copy)}))
    # an interrupted tokenize stage: task 1 and the report never finished
    (copy / "logs" / "tokenize" / "completions" / "00001").unlink()
    for f in (copy / "tokens").glob("00001.*"):
        f.unlink()
    shutil.rmtree(copy / "logs" / "report")
    (copy / "manifest.json").unlink()
    before = (copy / "tokens" / "00000.bin").stat().st_mtime_ns
    assert build(cfg, workers=1) == manifest
    assert (copy / "tokens" / "00000.bin").stat().st_mtime_ns == before  # finished tasks are not redone
    a, b = TokenDataset(out), TokenDataset(copy)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_rerun_with_other_settings_is_refused(built):
    config, *_ = built
    with pytest.raises(DscoderError, match="holds a build with other settings \\(vocab_size\\)"):
        build(BuildConfig(**{**config.__dict__, "vocab_size": 700}), workers=1)


def test_cli_bad_input(tmp_path, capsys):
    assert main(["data", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert main(["data", "build", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--rule", "max_lines=x"]) == 2
    assert "data rule 'max_lines' = 'x'" in capsys.readouterr().err
    assert main(["data", "build", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--rule", "nope=1"]) == 2
    assert "unknown data rule 'nope'" in capsys.readouterr().err
    assert main(["data", "build", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dscoder: error:" in err and "tokenizer.json" in err and "Traceback" not in err


def test_jsonl_source_with_a_bad_record(tmp_path):
    src = tmp_path / "docs.jsonl"
    code = (Path(__file__).parent / "data_corpus.py").read_text()
    src.write_text(json.dumps({"text": code, "path": "a/corpus.py"}) + "\nnot json\n"
                   + json.dumps({"content": "x = 1\nprint(x)\n" * 5, "path": "b/small.py"}) + "\n")
    manifest = build(BuildConfig(sources=[str(src)], out=str(tmp_path / "out"), tasks=1, vocab_size=300,
                                 humaneval=False), workers=1)
    assert manifest["documents_in"] == 3 and manifest["documents_kept"] == 2
    assert manifest["dropped"] == {"bad_record": 1}


@pytest.mark.skipif(not (MBPP.parent.parent / "deepseek-coder-v2-languages.txt").exists(), reason="no shared data")
def test_language_coverage_report(capsys):
    assert main(["data", "languages", "--paper-list", str(MBPP.parent.parent / "deepseek-coder-v2-languages.txt")]) == 0
    out = capsys.readouterr().out
    covered, total = (int(x) for x in out.split(" languages covered")[0].split(" of "))
    assert total == 338 and covered >= 280
    assert "Perl 6 -> Raku" in out


def test_parquet_text_build_without_code_rules_and_tokenizer_cli(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prose = ["The derivative of x squared is two x, by the power rule of calculus.\n" * 3,
             "A prime number has exactly two divisors: one and itself. Seven is prime.\n" * 2,
             "Sums of the first n odd numbers give the n-th square number, as tiles show.\n" * 2]
    pq.write_table(pa.table({"text": prose, "id": ["a", "b", "c"]}), tmp_path / "math.parquet")
    out = tmp_path / "math"
    assert main(["data", "build", str(tmp_path / "math.parquet"), "--out", str(out), "--vocab-size", "300",
                 "--tasks", "1", "--workers", "1", "--no-humaneval", "--rule", "code_rules=false"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents_kept"] == 3 and manifest["languages"] == {"Text": 3}
    assert "3 kept of 3" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--data", str(out), "--vocab-size", "280", "--out", str(tmp_path / "tok")]) == 0
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 280
    assert main(["tokenizer", "train", "--data", str(tmp_path), "--out", str(tmp_path / "t2")]) == 2
    assert "no documents/" in capsys.readouterr().err


def test_cluster_executors_are_chained_stages(tmp_path):
    """Slurm jobs are built (not submitted): one per stage, each depending on the previous."""
    from dscoder.data.pipeline import STAGES, make_executors

    config = BuildConfig(sources=[str(tmp_path)], out=str(tmp_path / "out"), tasks=6)
    executors = make_executors(config, "slurm", slurm={"partition": "cpu", "time": "1:00:00"})
    assert [type(e).__name__ for e in executors] == ["SlurmPipelineExecutor"] * len(STAGES)
    assert [e.tasks for e in executors] == [6, 1, 1, 6, 1]
    assert all(b.depends is a for a, b in zip(executors, executors[1:]))
    with pytest.raises(DscoderError, match="unknown executor 'spark'"):
        make_executors(config, "spark")
