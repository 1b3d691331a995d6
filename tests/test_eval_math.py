"""MATH: boxed-answer extraction and equivalence by math-verify (equivalent forms agree), both row formats, scores."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, jsonl_rows, samples_file, write_lines
from dscoder.cli import main
from dscoder.eval.math import equivalent, last_boxed
from dscoder.eval.run import evaluate


def test_the_last_boxed_answer_with_nested_braces():
    assert last_boxed("first \\boxed{1}, finally \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("answer", ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}", "\\frac12"])
def test_equivalent_forms_of_one_half_agree(answer):
    assert equivalent("\\frac{1}{2}", answer) and equivalent("0.5", answer)


@pytest.mark.parametrize("gold, answer", [("\\frac{1}{2}", "\\frac{1}{3}"), ("2", "3"), ("x+1", "x-1")])
def test_different_answers_do_not(gold, answer):
    assert not equivalent(gold, answer)
    assert not equivalent(gold, None)


def test_math_scores_both_row_formats(tmp_path, capsys):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1",
             "type": "Algebra"},
            {"problem": "2+2?", "answer": "4", "subject": "Prealgebra", "level": 1, "unique_id": "test/pre/1.json"}]
    problems = write_lines(tmp_path / "test.jsonl", rows)
    samples = samples_file(tmp_path / "s.jsonl", [("MATH/0", "So the answer is \\boxed{0.5}."),
                                                  ("MATH/test/pre/1.json", "\\boxed{5}")])
    summary = evaluate("math", tmp_path / "o", samples=samples, problems=str(problems), style="instruct")
    assert summary["accuracy"] == 0.5 and summary["subjects"] == {"Algebra": 1.0, "Prealgebra": 0.0}
    verdicts = {r["task_id"]: r["verdict"] for r in jsonl_rows(tmp_path / "o" / "results.jsonl")}
    assert verdicts == {"MATH/0": "passed", "MATH/test/pre/1.json": "failed"}
    bad = write_lines(tmp_path / "bad.jsonl", [{"problem": "no answer"}])
    assert main(["eval", "math", "--samples", str(samples), "--problems", str(bad), "--out", str(tmp_path / "b")]) != 0
    assert_one_line_error(capsys.readouterr().err, "bad.jsonl:1", "not a MATH record")
