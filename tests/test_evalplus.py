"""EvalPlus's HumanEval+ and MBPP+: files in EvalPlus's format written here, expected outputs from the canonical
solutions run in the sandbox, verdicts, plus inputs that catch a solution passing only the base ones, the float and
special-oracle rules, base_pass@1 beside pass@1."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, jsonl_rows, samples_file, write_lines
from dscoder.cli import main
from dscoder.eval.run import evaluate

ADD = {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """a + b"""\n', "entry_point": "add",
       "canonical_solution": "    return a + b\n", "base_input": [[1, 2], [3, 4]],
       "plus_input": [[10 ** 12, 1], [-5, 5], [2.5, 0.25]], "atol": 0}
HALF = {"task_id": "HumanEval/1", "prompt": "def half(x):\n", "entry_point": "half",
        "canonical_solution": "    return x / 2\n", "base_input": [[1.0]], "plus_input": [[3.0], [1e-3]], "atol": 0}

ADD_SAMPLES = {
    "passed": "    return a + b\n",
    "base only": "    return a + b if abs(a) < 100 else 0\n",
    "timeout": "    while True:\n        pass\n",
    "runtime_error": "    raise ValueError('no')\n",
    "compile_error": "    return a +\n",
}
HALF_SAMPLES = {"close": "    return x * 0.5000000001\n", "far": "    return x / 3\n"}


@pytest.fixture(scope="module")
def humaneval_plus(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalplus")
    problems = write_lines(d / "HumanEvalPlus.jsonl", [ADD, HALF])
    pairs = [("HumanEval/0", c) for c in ADD_SAMPLES.values()] + [("HumanEval/1", c) for c in HALF_SAMPLES.values()]
    return problems, samples_file(d / "samples.jsonl", pairs)


def test_verdicts_plus_inputs_and_base_pass(humaneval_plus, tmp_path):
    problems, samples = humaneval_plus
    summary = evaluate("humaneval+", tmp_path / "o", samples=samples, problems=str(problems), min_time_limit=0.5)
    rows = {(r["task_id"], r["sample"]): r for r in jsonl_rows(tmp_path / "o" / "results.jsonl")}
    verdicts = {k: r["verdict"] for k, r in rows.items()}
    assert verdicts == {("HumanEval/0", 0): "passed", ("HumanEval/0", 1): "failed", ("HumanEval/0", 2): "timeout",
                        ("HumanEval/0", 3): "runtime_error", ("HumanEval/0", 4): "compile_error",
                        ("HumanEval/1", 0): "passed", ("HumanEval/1", 1): "failed"}
    # the solution right only on small inputs passes the base inputs and is caught by the plus ones
    base_only = rows[("HumanEval/0", 1)]
    assert base_only["metrics"]["base_passed"] is True and not base_only["passed"]
    assert base_only["reason"].startswith("AssertionError: plus input 0")
    assert [rows[("HumanEval/0", i)]["metrics"]["base_passed"] for i in range(5)] == [True, True, False, False,
                                                                                        False]
    assert summary["pass@1"] == pytest.approx((1 / 5 + 1 / 2) / 2)
    assert summary["base_pass@1"] == pytest.approx((2 / 5 + 1 / 2) / 2)
    assert summary["time_limits"] == {"floor_s": 0.5, "factor": 4.0}
    assert all({"task_id", "completion", "passed", "verdict"} <= set(r) for r in rows.values())


def test_the_cli_prints_both_scores_and_one_and_two_workers_agree(humaneval_plus, tmp_path, capsys):
    problems, samples = humaneval_plus
    for workers in ("1", "2"):
        assert main(["eval", "humaneval+", "--samples", str(samples), "--problems", str(problems), "--out",
                     str(tmp_path / workers), "--min-time-limit", "0.5", "--workers", workers]) == 0
    out = capsys.readouterr().out
    assert "base_pass@1" in out and "pass@1" in out
    one, two = (json.loads((tmp_path / w / "summary.json").read_text()) for w in ("1", "2"))
    assert {k: one[k] for k in ("pass@1", "base_pass@1", "not_passed")} == \
        {k: two[k] for k in ("pass@1", "base_pass@1", "not_passed")}


def test_mbpp_plus_special_oracles(tmp_path):
    rows = [{"task_id": "Mbpp/2", "prompt": '"""\nShared elements.\n"""\n', "entry_point": "similar_elements",
             "canonical_solution": "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n",
             "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[1, 2], [2, 1]]], "atol": 0},
            {"task_id": "Mbpp/787", "prompt": '"""\nabbb\n"""\n', "entry_point": "text_match_three",
             "canonical_solution": "import re\ndef text_match_three(text):\n    return re.search('ab{3}', text)\n",
             "base_input": [["ac"], ["abbbba"]], "plus_input": [["xabbb"]], "atol": 0}]
    problems = write_lines(tmp_path / "MbppPlus.jsonl", rows)
    samples = samples_file(tmp_path / "s.jsonl", [
        ("Mbpp/2", "def similar_elements(a, b):\n    return tuple(set(b) & set(a))[::-1]\n"),  # another order
        ("Mbpp/787", "import re\ndef text_match_three(text):\n    return re.search('abbb', text)\n"),  # a Match
        ("Mbpp/787", "def text_match_three(text):\n    return 'abbb' in text\n")])  # a bool
    summary = evaluate("mbpp+", tmp_path / "o", samples=samples, problems=str(problems), min_time_limit=0.5)
    assert [r["verdict"] for r in jsonl_rows(tmp_path / "o" / "results.jsonl")] == ["passed", "passed", "passed"]
    assert summary["pass@1"] == 1.0 and summary["base_pass@1"] == 1.0


def test_a_canonical_solution_that_fails_is_one_line(tmp_path, capsys):
    broken = dict(ADD, canonical_solution="    return a + b + undefined_name\n")
    problems = write_lines(tmp_path / "p.jsonl", [broken])
    samples = samples_file(tmp_path / "s.jsonl", [("HumanEval/0", "    return a + b\n")])
    assert main(["eval", "humaneval+", "--samples", str(samples), "--problems", str(problems), "--out",
                 str(tmp_path / "o")]) != 0
    assert_one_line_error(capsys.readouterr().err, "HumanEval/0", "canonical solution failed", "NameError")
    bad = write_lines(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/0"}])
    assert main(["eval", "humaneval+", "--samples", str(samples), "--problems", str(bad), "--out",
                 str(tmp_path / "o")]) != 0
    assert_one_line_error(capsys.readouterr().err, "bad.jsonl:1", "not an EvalPlus record")
