"""`dscoder eval` under bad input and failure: one line and a non-zero exit, never a traceback; nothing of an earlier
run lost; the task registry and the program contract with the sandbox."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import MBPP, jsonl_rows, write_lines
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval.base import shown_program
from dscoder.eval.run import evaluate, verdict
from dscoder.eval.sandbox import Limits, RunResult, Sandbox
from dscoder.eval.tasks import TASKS, fim, humaneval, load_task

EVAL = Path(__file__).resolve().parents[1] / "src" / "dscoder" / "eval"


def _gsm8k(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "gsm8k.jsonl", [
        {"question": "Ann has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7", "idx": 0},
        {"question": "What is 600 * 2?", "answer": "600 * 2 = 1200\n#### 1200", "idx": 1}])


def _error(capsys) -> str:
    """The CLI's stderr: exactly one line, an error, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dscoder: error: "), err
    return lines[0]


# ----- nothing an earlier run wrote is lost ---------------------------------------------------------------------------
def test_a_failed_run_keeps_the_earlier_results(tmp_path, capsys):
    data, out = _gsm8k(tmp_path), tmp_path / "out"
    good = write_lines(tmp_path / "good.jsonl", [{"task_id": "GSM8K/0", "completion": "The answer is 7."},
                                                 {"task_id": "GSM8K/1", "completion": "The answer is 5."}])
    assert main(["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(good), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "summary.json")}
    bad = write_lines(tmp_path / "bad.jsonl", [{"task_id": "GSM8K/0", "completion": "7"},
                                               {"task_id": ["GSM8K/1"], "completion": "7"}])
    attempts = [
        ["--samples", str(bad)],  # a bad samples file
        ["--samples", str(tmp_path / "missing.jsonl")],
        ["--samples", str(good), "--k", "0"],  # a bad number
        ["--endpoint", "http://127.0.0.1:9"],  # generation fails (nothing listens there)
    ]
    for extra in attempts:
        assert main(["eval", "gsm8k", "--gsm8k", str(data), "--out", str(out), *extra]) == 2, extra
        _error(capsys)
        assert {name: (out / name).read_bytes() for name in before} == before, extra
        assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.json"]  # no temporary left
    # --resume over a damaged results file: one line, and the file is left for the user to look at
    (out / "results.jsonl").write_text('{"task_id": "GSM8K/0", "sample": 0, "passed": true}\nnot json\n')
    assert main(["eval", "gsm8k", "--gsm8k", str(data), "--out", str(out), "--samples", str(good), "--resume"]) == 2
    assert "results.jsonl:2: not valid JSON" in _error(capsys)
    assert (out / "results.jsonl").read_text().endswith("not json\n")


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    data, out = _gsm8k(tmp_path), tmp_path / "a-file"
    out.write_text("mine\n")
    good = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/0", "completion": "7"}])
    assert main(["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(good), "--out", str(out)]) == 2
    assert "is a file" in _error(capsys) and out.read_text() == "mine\n"


# ----- numbers out of range -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (["--k", "0"], "--k 0"), (["--k", "1,-2"], "--k -2"), (["--k", "x"], "--k 'x'"), (["--n", "0"], "--n 0"),
    (["--workers", "-1"], "--workers -1"), (["--limit", "0"], "--limit 0"), (["--max-tokens", "0"], "--max-tokens 0"),
    (["--temperature", "-1"], "--temperature -1"), (["--temperature", "nan"], "--temperature nan"),
    (["--timeout", "0"], "--timeout 0"), (["--context", "-5"], "--context -5"),
    (["--niah-lengths", "8"], "niah: lengths"), (["--niah-depths", "0,150"], "niah: lengths"),
    (["--mbpp", "x.jsonl"], "--mbpp is an option of mbpp, not of gsm8k"),
])
def test_out_of_range_numbers_give_one_line(tmp_path, capsys, extra, says):
    data = _gsm8k(tmp_path)
    good = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/0", "completion": "7"}])
    task = "niah" if extra[0].startswith("--niah") else "gsm8k"
    base = ["--gsm8k", str(data)] if task == "gsm8k" else []
    assert main(["eval", task, *base, "--samples", str(good), "--out", str(tmp_path / "o"), *extra]) == 2
    assert says in _error(capsys)
    assert not (tmp_path / "o").exists()  # checked before --out is touched


def test_pass_at_k_beyond_the_samples_generated_is_refused(tmp_path, capsys):
    # refused before any request: nothing listens on port 9
    assert main(["eval", "humaneval", "--endpoint", "http://127.0.0.1:9", "--n", "2", "--k", "1,5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "pass@5 needs --n 5" in _error(capsys)


def test_pass_at_k_beyond_the_samples_in_the_file_is_refused(tmp_path, capsys):
    """--samples with fewer samples per problem than k: one line (it used to exit 0 with no scores at all)."""
    data = _gsm8k(tmp_path)
    two = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/0", "completion": "7"},
                                             {"task_id": "GSM8K/0", "completion": "8"},
                                             {"task_id": "GSM8K/1", "completion": "1200"}])
    argv = ["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(two), "--out", str(tmp_path / "o")]
    assert main([*argv, "--k", "1,2"]) == 2
    assert "--k 2: " in (line := _error(capsys)) and "1 sample(s) for GSM8K/1" in line
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--k", "1"]) == 0


def test_endpoints_that_are_not_urls_or_not_openai_servers_give_one_line(tmp_path, capsys):
    import http.server
    import threading

    class NotOpenAI(http.server.BaseHTTPRequestHandler):  # a web server that is not an OpenAI-compatible one
        def do_GET(self):
            self._send(200, b"<html><body>a web page\n</body></html>\n")

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(501, b"<html>\n<h1>Not implemented</h1>\n</html>\n")

        def _send(self, code, body):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    data = _gsm8k(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for extra, says in [(["--endpoint", "localhost:8000"], "expected an http:// or https:// URL"),
                            (["--endpoint", url], "/v1/models: the reply is not JSON"),
                            (["--endpoint", url, "--endpoint-model", "m"], "/v1/completions: HTTP 501 <html> <h1>")]:
            assert main(["eval", "gsm8k", "--gsm8k", str(data), "--out", str(tmp_path / "o"), *extra]) == 2
            assert says in _error(capsys), extra
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "o").exists()


# ----- samples files --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [
    {"task_id": ["GSM8K/0"], "completion": "7"}, {"task_id": {"id": 0}, "completion": "7"},
    {"task_id": 0, "completion": "7"}, {"task_id": "GSM8K/0", "completion": ["7"]},
    {"task_id": "GSM8K/0", "completion": None}, {"task_id": "GSM8K/0"}, ["GSM8K/0", "7"],
])
def test_samples_with_values_of_the_wrong_type_name_the_line(tmp_path, capsys, row):
    data = _gsm8k(tmp_path)
    samples = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/1", "completion": "1200"}, row])
    assert main(["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(samples), "--out", str(tmp_path / "o")]) == 2
    assert f"{samples}:2: expected" in _error(capsys)


def test_samples_that_are_not_utf8_or_not_json(tmp_path, capsys):
    data = _gsm8k(tmp_path)
    # (dscoder.io decodes in blocks, so the line it names for bad UTF-8 may be an earlier one)
    for name, bad, says in (("latin1.jsonl", b'{"task_id": "GSM8K/0", "completion": "caf\xe9"}', "not valid UTF-8"),
                            ("broken.jsonl", b'{"task_id": "GSM8K/0", ', ":2: not valid JSON")):
        samples = write_lines(tmp_path / name, [{"task_id": "GSM8K/1", "completion": "1200"}, bad])
        assert main(["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(samples),
                     "--out", str(tmp_path / "o")]) == 2
        line = _error(capsys)
        assert f"{name}:" in line and says in line


def test_task_data_of_the_wrong_shape_names_the_line(tmp_path, capsys):
    samples = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/0", "completion": "7"}])
    for row in ({"question": ["q"], "answer": "#### 7"}, {"question": "q", "answer": "#### 7", "idx": [0]}, [1, 2]):
        data = write_lines(tmp_path / "g.jsonl", [row])
        assert main(["eval", "gsm8k", "--gsm8k", str(data), "--samples", str(samples),
                     "--out", str(tmp_path / "o")]) == 2
        assert "g.jsonl:1: expected" in _error(capsys)
    mbpp = write_lines(tmp_path / "mbpp.jsonl", [{"task_id": 2, "text": "t", "code": "c", "test_list": "assert 1"}])
    with pytest.raises(DscoderError, match="mbpp.jsonl:1: not an MBPP record"):
        load_task("mbpp", mbpp_path=mbpp)


# ----- verdicts -------------------------------------------------------------------------------------------------------
def test_verdicts_from_the_sandbox_result():
    python = {"tests": "def check(c): pass", "check": "check", "entry_point": "f"}
    command = {"file": "main.sh", "command": "bash main.sh"}
    cases = [(RunResult("passed"), python, "passed"), (RunResult("timeout", "timed out after 10 s"), python, "timeout"),
             (RunResult("failed", "AssertionError"), python, "failed"),
             (RunResult("failed", "AssertionError: expected 3"), python, "failed"),
             (RunResult("failed", "ZeroDivisionError: division by zero"), python, "runtime_error"),
             (RunResult("failed", "CPU time limit"), python, "runtime_error"),
             (RunResult("failed", "the program raised NameError: name 'x' is not defined"), python, "runtime_error"),
             (RunResult("failed", "ValueError: boom at tests line 3: assert f(1)"), python, "runtime_error"),
             (RunResult("failed", "memory limit (1024 MiB for the whole run)"), python, "runtime_error"),
             (RunResult("failed", "the program exited before its checks finished (SystemExit 0)"), python, "failed"),
             (RunResult("failed", "the program exited before its checks finished (killed by signal 9)"), python,
              "runtime_error"),
             (RunResult("failed", "the candidate returned a Yes, not plain data"), python, "failed"),
             (RunResult("failed", "the program does not define f"), python, "failed"),
             (RunResult("failed", "sandbox setup failed: mount: permission denied"), python, "sandbox_error"),
             (RunResult("failed", "exit code 1"), command, "failed")]
    assert [verdict(r, call) for r, call, _ in cases] == [want for *_, want in cases]


def test_results_rows_carry_a_verdict(tmp_path):
    data = _gsm8k(tmp_path)
    samples = write_lines(tmp_path / "s.jsonl", [{"task_id": "GSM8K/0", "completion": "The answer is 7."},
                                                 {"task_id": "GSM8K/1", "completion": "The answer is 3."}])
    summary = evaluate("gsm8k", tmp_path / "o", samples=samples, gsm8k_path=data)
    rows = jsonl_rows(tmp_path / "o" / "results.jsonl")
    assert [r["verdict"] for r in rows] == ["passed", "failed"] and summary["not_passed"] == {"failed": 1}


def test_execution_verdicts_end_to_end(tmp_path):
    problems = humaneval()[:4]
    completions = [problems[0].reference, "    return None\n", "    raise ValueError('boom')\n",
                   "    while True:\n        pass\n"]
    samples = write_lines(tmp_path / "s.jsonl", [{"task_id": p.task_id, "completion": c}
                                                 for p, c in zip(problems, completions)])
    summary = evaluate("humaneval", tmp_path / "o", samples=samples, limit=4, limits=Limits(timeout_s=2), workers=2)
    rows = jsonl_rows(tmp_path / "o" / "results.jsonl")
    assert [r["verdict"] for r in rows] == ["passed", "failed", "runtime_error", "timeout"], [r["reason"] for r in rows]
    assert summary["not_passed"] == {"failed": 1, "runtime_error": 1, "timeout": 1}
    # the row shows what ran, as one could rerun it: candidate, tests, check call
    assert rows[0]["program"].endswith(f"\ncheck({problems[0].data['entry_point']})\n")
    assert problems[0].data["test"].strip() in rows[0]["program"]
    assert rows[0]["call"] == {"check": "check", "entry_point": problems[0].data["entry_point"]}


# ----- the program contract: the tests travel apart from the candidate ------------------------------------------------
def test_programs_keep_the_tests_apart_from_the_candidate():
    he, he_chat, fm = humaneval()[0], humaneval("instruct")[0], fim()[0]
    for p in (he, he_chat, fm):
        source, call = p.program(p.reference)
        assert call == {"tests": p.data["test"], "check": "check", "entry_point": p.data["entry_point"],
                        "prelude": p.data["prompt"]}  # the prompt's helpers are the checker's
        assert p.data["test"].strip() not in source and f"def {p.data['entry_point']}" in source
        shown = shown_program(source, call)
        assert shown.startswith(source.rstrip("\n")) and p.data["test"].strip() in shown
    assert he.program("    return 1\n")[0] == he.data["prompt"] + "    return 1\n\n"


def test_reward_problems_follow_the_contract():
    from dscoder.align.reward import problem_from_row

    he = problem_from_row({"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n",
                           "entry_point": "f"}, "row 1")
    source, call = he.program("    return x + 1\n")
    assert source == "def f(x):\n    return x + 1\n\n" and call["tests"].startswith("def check")
    mb = problem_from_row({"prompt": "Write f.", "test_list": ["assert f(1) == 2"], "test_setup_code": "import os"},
                          "row 2")
    source, call = mb.program("def f(x):\n    return x + 1\n[DONE]")
    assert source == "def f(x):\n    return x + 1\n\n" and call == {"tests": "import os\nassert f(1) == 2\n",
                                                                     "entry_point": "f"}


@pytest.mark.skipif(not MBPP.exists(), reason="no shared MBPP data")
def test_mbpp_program_contract():
    problems = {p.task_id: p for p in load_task("mbpp", mbpp_path=MBPP)}
    p = problems["MBPP/11"]
    source, call = p.program(p.reference)
    assert set(call) == {"tests", "entry_point"} and call["entry_point"] == "remove_Occ"
    assert all(t in call["tests"] for t in p.data["test_list"])
    assert not any(t in source for t in p.data["test_list"])
    # MBPP/126's function is named `sum`: the tests must reach the candidate's, not the built-in
    p = problems["MBPP/126"]
    source, call = p.program(p.reference)
    assert call["entry_point"] == "sum"
    assert Sandbox().run(source, call).passed
    assert not Sandbox().run("def sum(a, b):\n    return a + b\n", call).passed


# ----- the registry ---------------------------------------------------------------------------------------------------
def test_the_cli_offers_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "{" + ",".join(TASKS) + "}" in text  # the task choices
    for name, t in TASKS.items():
        assert t.name == name and t.prompt_version and f"  {name:<10} {t.help}" in text
        for opt in t.options:
            assert opt.flag in text
    with pytest.raises(DscoderError, match="task humaneval has no option 'mbpp_path'"):
        evaluate("humaneval", "unused", samples="unused", mbpp_path="x")
    with pytest.raises(DscoderError, match="unknown task 'cobol'"):
        evaluate("cobol", "unused", samples="unused")


def test_no_import_circles_in_eval():
    """Every dscoder.eval module's imports of other dscoder.eval modules, at any depth in the file, form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in EVAL.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            deps |= {n.split(".")[2] for n in names if n.startswith("dscoder.eval.")}
            if isinstance(node, ast.ImportFrom) and node.module == "dscoder.eval":
                deps |= {a.name for a in node.names}
        graph[path.stem] = deps - {path.stem}

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import circle: {' -> '.join((*path, node))}"
        for dep in graph.get(node, ()):
            visit(dep, (*path, node))

    for module in graph:
        visit(module, ())
    assert "multipl_e" in graph["tasks"] and "tasks" not in graph["multipl_e"] | graph["niah"]
