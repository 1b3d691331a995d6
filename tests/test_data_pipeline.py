"""`dscoder data build` end to end on a corpus with planted bad files; resume; bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MBPP, assert_one_line_error
from data_corpus import make_corpus
from dscoder.cli import main
from dscoder.data.pipeline import BuildConfig, build
from dscoder.data.shards import TokenDataset
from dscoder.errors import DscoderError
from dscoder.tokenizer import Tokenizer


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


def test_jsonl_source_with_bad_records(tmp_path, capfd):
    """A line that is not an object, or whose text is not a string, is skipped and counted; the build goes on."""
    src = tmp_path / "docs.jsonl"
    code = (Path(__file__).parent / "data_corpus.py").read_text()
    bad = ["not json", "[1, 2]", json.dumps({"text": 5}), json.dumps({"text": ["a"], "path": "c.py"}),
           json.dumps({"content": {"x": 1}, "path": ["odd"]})]
    src.write_text("\n".join([json.dumps({"text": code, "path": "a/corpus.py"}), *bad,
                              json.dumps({"content": "x = 1\nprint(x)\n" * 5, "path": "b/small.py"}),
                              json.dumps({"path": "d.py"})]) + "\n")
    assert main(["data", "build", str(src), "--out", str(tmp_path / "out"), "--tasks", "2", "--workers", "1",
                 "--vocab-size", "300", "--no-humaneval"]) == 0
    assert "Traceback" not in capfd.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["documents_in"] == 8 and manifest["documents_kept"] == 2
    assert manifest["dropped"] == {"bad_record": 5, "no_text": 1}
    rejected = _rejected_rows(tmp_path / "out")
    assert {r["path"] for r in rejected if r["rule"] == "bad_record"} == {"docs.jsonl#2", "docs.jsonl#3",
                                                                          "docs.jsonl#4", "c.py", "docs.jsonl#6"}


def _rejected_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "rejected").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh]
    return rows


def _build_args(src, out, *extra) -> list[str]:
    return ["data", "build", str(src), "--out", str(out), "--tasks", "1", "--workers", "1", "--vocab-size", "300",
            "--no-humaneval", *extra]


def _error_line(capfd) -> str:
    """stderr without the 'building ...' line the CLI prints before it starts."""
    err = capfd.readouterr().err
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("building "))


def _small_tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    for name in ("textwrap.py", "colorsys.py"):
        (root / "pkg" / name).write_text((Path(shutil.__file__).parent / name).read_text(encoding="utf-8"))
    return root


def _alarm(seconds: int):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def on_alarm(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    return previous


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_rejected_without_being_opened(tmp_path, capfd):
    src = _small_tree(tmp_path / "src")
    os.mkfifo(src / "pkg" / "pipe.py")  # opening it for reading would block until a writer comes: forever
    unreadable = os.geteuid() != 0  # root reads everything
    if unreadable:
        (src / "pkg" / "secret.py").write_text("x = 1\n")
        (src / "pkg" / "secret.py").chmod(0)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "pkg" / "sock.py"))
        previous = _alarm(120)
        try:
            code = main(_build_args(src, tmp_path / "out"))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    assert code == 0 and "Traceback" not in capfd.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dropped"] == {"special_file": 2, **({"unreadable": 1} if unreadable else {})}
    assert manifest["documents_kept"] == 2
    assert {r["path"] for r in _rejected_rows(tmp_path / "out") if r["rule"] == "special_file"} == {
        "src/pkg/pipe.py", "src/pkg/sock.py"}
    # a FIFO named as a source is refused up front
    assert main(_build_args(src / "pkg" / "pipe.py", tmp_path / "out2")) == 2
    assert_one_line_error(_error_line(capfd), "pipe.py", "not a regular file or a folder")


def test_bad_sources_and_arguments_are_one_line(tmp_path, capfd):
    src = _small_tree(tmp_path / "src")
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    lines = "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n" for i in range(300))
    packed = gzip.compress(lines.encode())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"text": "add two numbers", "code": "def add(a, b): return a + b"}) + "\n"
                    + json.dumps({"text": 1, "code": None}) + "\n")
    cases = [
        (_build_args(src, tmp_path / "o8", "--mbpp", str(mbpp)), ["mbpp.jsonl:2", "not an MBPP record"]),
        (_build_args(parquet, tmp_path / "o1"), ["broken.parquet", "not a readable parquet file"]),
        (_build_args(truncated, tmp_path / "o2"), ["cut.jsonl.gz", "truncated or corrupt gzip"]),
        (_build_args(src, a_file), ["a_file", "exists and is not a folder"]),
        (_build_args(src, tmp_path / "o3", "--vocab-size", "0"), ["vocab_size must be an integer >= 262", "0"]),
        (_build_args(src, tmp_path / "o4", "--tasks", "-2"), ["tasks must be an integer >= 1"]),
        (_build_args(src, tmp_path / "o5", "--workers", "0"), ["workers must be -1"]),
        (_build_args(src, tmp_path / "o6", "--rule", "min_alpha_fraction=1.5"), ["min_alpha_fraction", "[0, 1]"]),
        (_build_args(src, tmp_path / "o7", "--rule", "max_lines=-1"), ["max_lines", ">= 0"]),
        (_build_args(src, src / "pkg" / "out"), ["inside the source folder"]),
        # too large: the BPE trainer aborted the process (a Rust panic) after the filter stage; tasks ran for hours
        (_build_args(src, tmp_path / "o9", "--vocab-size", str(10**12)), ["vocab_size must be at most 16,777,216"]),
        (_build_args(src, tmp_path / "o10", "--tasks", str(10**8)), ["tasks must be at most 10,000"]),
    ]
    for args, needles in cases:
        assert main(args) == 2, args
        assert_one_line_error(_error_line(capfd), *needles)
    assert a_file.read_text() == "mine\n"  # nothing a user made is touched
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 11))  # refused before anything is written
    if shutil.which("sbatch") is None:  # a traceback from subprocess, after the build folder was written
        assert main(_build_args(src, tmp_path / "o11", "--executor", "slurm")) == 2
        assert_one_line_error(_error_line(capfd), "--executor slurm needs Slurm's sbatch")
        assert not (tmp_path / "o11").exists()


def test_resume_refuses_changed_sources(tmp_path, capfd):
    src = _small_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert main(_build_args(src, out)) == 0
    # killed in the tokenize stage, then the source tree changes before the rerun
    (out / "logs" / "tokenize" / "completions" / "00000").unlink()
    shutil.rmtree(out / "logs" / "report")
    capfd.readouterr()
    for change in (lambda: (src / "pkg" / "new.py").write_text("x = 1\n"),
                   lambda: os.utime(src / "pkg" / "colorsys.py", ns=(1, 1))):
        change()
        assert main(_build_args(src, out)) == 2
        assert_one_line_error(_error_line(capfd), str(src), "sources changed", "fresh --out")
    assert main(_build_args(src, tmp_path / "fresh")) == 0  # the advice works
    assert json.loads((tmp_path / "fresh" / "manifest.json").read_text())["documents_in"] == 3


def test_filter_task_refuses_files_added_during_the_build(tmp_path):
    from dscoder.data.pipeline import FilterStage, prepare

    src = _small_tree(tmp_path / "src")
    config = BuildConfig(sources=[str(src)], out=str(tmp_path / "out"), tasks=1, humaneval=False)
    prepare(config)
    os.utime(src / "pkg" / "colorsys.py", ns=(1, 1))  # content may change: each file is read once, by one task
    list(FilterStage(config).run())
    (src / "pkg" / "late.py").write_text("x = 1\n")  # but a new file would shift the documents' indices
    with pytest.raises(DscoderError, match="added or removed while this build ran"):
        list(FilterStage(config).run())


def _descendants(pid: int) -> dict[int, int]:
    """{pid: parent pid} of every live process below ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found[child] = parent
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_build(tmp_path):
    """SIGKILL the launching process while 2 pool workers filter the standard library: none of its processes
    (workers, datatrove's manager, the fork server) may outlive it."""
    proc = subprocess.Popen([sys.executable, "-m", "dscoder.cli", "data", "build", "--out", str(tmp_path / "out"),
                             "--tasks", "2", "--workers", "2", "--no-humaneval"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    below: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            below = _descendants(proc.pid)
            workers = [p for p, parent in below.items() if parent != proc.pid]  # the fork server's children
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(workers) >= 2, f"no pool workers seen: {below}"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(map(_alive, below)):
            time.sleep(0.1)
        survivors = [p for p in below if _alive(p)]
        assert not survivors, f"outlived the killed build: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for p in below:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


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
    (tmp_path / "a_file").write_text("mine\n")
    assert main(["tokenizer", "train", "--data", str(out), "--vocab-size", "280",
                 "--out", str(tmp_path / "a_file")]) == 2
    assert_one_line_error(capsys.readouterr().err, "a_file", "exists and is not a folder")
    assert (tmp_path / "a_file").read_text() == "mine\n"


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
