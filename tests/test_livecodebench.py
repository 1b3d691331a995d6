"""LiveCodeBench: problems in its code_generation_lite format written here, verdicts of stdin and functional programs,
the private-test pickle that must never run, the date window, workers not changing scores, and an end-to-end run
against `dscoder serve` on the tiny checkpoint."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest

from conftest import assert_one_line_error, jsonl_rows, running_app, write_lines
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval.livecodebench import decode_private, extract_code
from dscoder.eval.run import VERDICTS, evaluate


def packed(tests) -> str:
    """LiveCodeBench's compressed private tests: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def record(qid, date="2024-01-15T00:00:00", difficulty="easy", *, starter="", func=None, public=(), private=(),
           private_text=None):
    return {"question_title": qid, "question_content": f"Problem {qid}.", "platform": "atcoder" if not func
            else "leetcode", "question_id": qid, "contest_id": "c1", "contest_date": date, "starter_code": starter,
            "difficulty": difficulty, "public_test_cases": json.dumps(list(public)),
            "private_test_cases": private_text if private_text is not None else packed(list(private)),
            "metadata": json.dumps({"func_name": func} if func else {})}


def stdin_test(given, want):
    return {"input": given, "output": want, "testtype": "stdin"}


def func_test(args, want):
    return {"input": "\n".join(json.dumps(a) for a in args), "output": json.dumps(want), "testtype": "functional"}


SUM = record("sum", public=[stdin_test("1 2\n", "3\n")], private=[stdin_test("10 20\n", "30"),
                                                                 stdin_test("-1 1\n", "0\n")])
PAIR = record("pair", "2024-02-01T00:00:00", "medium", func="pairUp",
              starter="class Solution:\n    def pairUp(self, a: int, b: List[int]) -> List[int]:\n        ",
              public=[func_test([1, [2]], [1, 2])], private=[func_test([0, [5, 6]], [0, 5, 6])])

STDIN_SAMPLES = {
    "passed": "a, b = map(int, input().split())\nprint(a + b)",
    "decimal": "import sys\na, b = map(int, sys.stdin.read().split())\nprint(f'{a + b}.000')\nexit(0)",  # 3.000 == 3
    "failed": "a, b = map(int, input().split())\nprint(a - b)",
    "timeout": "while True:\n    pass",
    "runtime_error": "raise ValueError('no')",
    "compile_error": "def f(:\n    pass",
}
FUNC_SAMPLES = {
    "passed": "class Solution:\n    def pairUp(self, a, b):\n        return (a, *b)",  # a tuple counts as a list
    "failed": "class Solution:\n    def pairUp(self, a, b):\n        return [a]",
    "timeout": "class Solution:\n    def pairUp(self, a, b):\n        while True:\n            pass",
    "runtime_error": "class Solution:\n    def pairUp(self, a, b):\n        return b[10]",
}


def _samples(path: Path, pairs) -> Path:
    return write_lines(path, [{"task_id": t, "completion": c} for t, c in pairs])


def _verdicts(out: Path) -> dict[tuple[str, int], str]:
    return {(r["task_id"], r["sample"]): r["verdict"] for r in jsonl_rows(out / "results.jsonl")}


@pytest.fixture(scope="module")
def lcb(tmp_path_factory):
    d = tmp_path_factory.mktemp("lcb")
    problems = write_lines(d / "test.jsonl", [SUM, PAIR])
    pairs = [("LCB/sum", c) for c in STDIN_SAMPLES.values()] + [("LCB/pair", c) for c in FUNC_SAMPLES.values()]
    return problems, _samples(d / "samples.jsonl", pairs)


def test_stdin_and_functional_programs_get_their_verdicts(lcb, tmp_path):
    problems, samples = lcb
    summary = evaluate("livecodebench", tmp_path / "o", samples=samples, problems=str(problems), test_timeout=1.0)
    got = _verdicts(tmp_path / "o")
    want = {("LCB/sum", i): "passed" if v == "decimal" else v for i, v in enumerate(STDIN_SAMPLES)}
    want.update({("LCB/pair", i): v for i, v in enumerate(FUNC_SAMPLES)})
    assert got == want
    rows = jsonl_rows(tmp_path / "o" / "results.jsonl")
    assert all({"task_id", "completion", "passed", "verdict"} <= set(r) for r in rows)
    assert all(r["passed"] == (r["verdict"] == "passed") for r in rows)
    assert summary["pass@1"] == pytest.approx((2 / 6 + 1 / 4) / 2)
    assert summary["difficulties"]["easy"]["pass@1"] == pytest.approx(2 / 6)
    assert summary["difficulties"]["medium"]["pass@1"] == pytest.approx(1 / 4)
    wrong = next(r for r in rows if r["task_id"] == "LCB/sum" and r["verdict"] == "failed")
    assert "test 0: wrong answer" in wrong["reason"]


def test_a_private_test_that_fails_fails_the_sample(tmp_path):
    """The public test passes, the second private test (from the pickle) does not: the sample fails there."""
    problems = write_lines(tmp_path / "p.jsonl", [SUM])
    only_public = "a, b = map(int, input().split())\nprint(3 if a == 1 else a + b + (a < 0))"
    evaluate("livecodebench", tmp_path / "o", samples=_samples(tmp_path / "s.jsonl", [("LCB/sum", only_public)]),
             problems=str(problems), test_timeout=2.0)
    row = jsonl_rows(tmp_path / "o" / "results.jsonl")[0]
    assert row["verdict"] == "failed" and row["reason"].startswith("test 2: wrong answer")


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_poisoned_pickle_in_the_private_tests_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    boom = Boom()
    boom.marker = marker
    poisoned = base64.b64encode(zlib.compress(pickle.dumps(boom))).decode()
    assert b"system" in zlib.decompress(base64.b64decode(poisoned))  # GLOBAL/STACK_GLOBAL + REDUCE of os.system
    problems = write_lines(tmp_path / "p.jsonl", [SUM, record("evil", private_text=poisoned,
                                                               public=[stdin_test("1\n", "1\n")])])
    samples = _samples(tmp_path / "s.jsonl", [("LCB/sum", STDIN_SAMPLES["passed"])])
    code = main(["eval", "livecodebench", "--samples", str(samples), "--problems", str(problems),
                 "--out", str(tmp_path / "o")])
    assert code != 0 and not marker.exists() and not (tmp_path / "o").exists()
    assert_one_line_error(capsys.readouterr().err, "evil", "private_test_cases", "refused")
    # nor a pickle of anything but a string, nor one that would build an object without a global
    with pytest.raises(DscoderError, match="not a plain string"):
        decode_private(base64.b64encode(zlib.compress(pickle.dumps({"a": 1}))).decode(), "p")
    with pytest.raises(DscoderError, match="neither JSON nor"):
        decode_private("not base64 at all!", "p")
    assert decode_private(packed([{"input": "1", "output": "2"}]), "p") == [{"input": "1", "output": "2"}]


def test_the_date_window_filters_problems(tmp_path):
    rows = [record("dec", "2023-12-10T00:00:00", public=[stdin_test("1 1", "2")]),
            record("jan", "2024-01-15T12:00:00", public=[stdin_test("1 1", "2")]),
            record("jul", "2024-07-01T00:00:00", public=[stdin_test("1 1", "2")])]
    problems = write_lines(tmp_path / "p.jsonl", rows)
    samples = _samples(tmp_path / "s.jsonl", [(f"LCB/{r['question_id']}", STDIN_SAMPLES["passed"]) for r in rows])
    assert main(["eval", "livecodebench", "--samples", str(samples), "--problems", str(problems), "--out",
                 str(tmp_path / "o"), "--start-date", "2024-01-01", "--end-date", "2024-06-01"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["problems"] == 1 and summary["pass@1"] == 1.0
    assert summary["start_date"] == "2024-01-01" and summary["end_date"] == "2024-06-01"
    assert [r["task_id"] for r in jsonl_rows(tmp_path / "o" / "results.jsonl")] == ["LCB/jan"]
    # LiveCodeBench compares with the end date's midnight: a problem later that day is out
    with pytest.raises(DscoderError, match="no problem in the date window"):
        evaluate("livecodebench", tmp_path / "o2", samples=samples, problems=str(problems), start_date="2024-01-15",
                 end_date="2024-01-15")


def test_one_and_two_workers_give_the_same_scores(lcb, tmp_path):
    problems, samples = lcb
    one = evaluate("livecodebench", tmp_path / "w1", samples=samples, problems=str(problems), test_timeout=1.0,
                   workers=1)
    two = evaluate("livecodebench", tmp_path / "w2", samples=samples, problems=str(problems), test_timeout=1.0,
                   workers=2)
    assert _verdicts(tmp_path / "w1") == _verdicts(tmp_path / "w2")
    assert one["pass@1"] == two["pass@1"] and one["difficulties"] == two["difficulties"]


def test_code_is_taken_from_answers_as_livecodebench_takes_it():
    chat = "Here:\n```python\nprint(1)\n```\nand better:\n```python\nprint(2)\n```\nDone."
    assert extract_code(chat, chat=True) == "print(2)"
    assert extract_code("no fences here", chat=True) == ""
    assert extract_code("\n  print(3)\n\n", chat=False) == "print(3)"


def test_bad_problem_files_are_one_line(tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", [{"question_id": "x"}])
    samples = _samples(tmp_path / "s.jsonl", [("LCB/x", "print(1)")])
    assert main(["eval", "livecodebench", "--samples", str(samples), "--problems", str(bad), "--out",
                 str(tmp_path / "o")]) != 0
    assert_one_line_error(capsys.readouterr().err, "bad.jsonl:1", "not a LiveCodeBench record")
    assert main(["eval", "livecodebench", "--samples", str(samples), "--problems", str(bad), "--out",
                 str(tmp_path / "o"), "--start-date", "2024-13-01"]) != 0
    assert_one_line_error(capsys.readouterr().err, "--start-date", "YYYY-MM-DD")


def test_livecodebench_against_dscoder_serve_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    """End to end: prompts out to the server, completions back, every one run in the sandbox with a verdict."""
    pytest.importorskip("uvicorn")
    from dscoder.engine import Engine
    from dscoder.serve import create_app

    problems = write_lines(tmp_path / "p.jsonl", [SUM, PAIR])
    engine = Engine(tiny_checkpoint, max_batch_size=4, max_len=1024)
    try:
        with running_app(create_app(engine, model_name="tiny")) as url:
            assert main(["eval", "livecodebench", "--endpoint", url, "--problems", str(problems), "--out",
                         str(tmp_path / "o"), "--max-tokens", "8", "--test-timeout", "1"]) == 0
    finally:
        engine.close()
    rows = jsonl_rows(tmp_path / "o" / "results.jsonl")
    assert sorted(r["task_id"] for r in rows) == ["LCB/pair", "LCB/sum"]
    assert all(r["verdict"] in VERDICTS and isinstance(r["completion"], str) for r in rows)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["problems"] == 2 and "pass@1" in summary and set(summary["difficulties"]) == {"easy", "medium"}
