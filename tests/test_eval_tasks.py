"""The eval tasks beyond HumanEval/MBPP: FIM (exact match + execution), GSM8K (answer extraction), NIAH (grid and
heatmap), MultiPL-E (programs in other languages through the sandbox's command mode)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_DATA, jsonl_rows, samples_file
from dscoder.cli import main
from dscoder.errors import DscoderError
from dscoder.eval import niah
from dscoder.eval.run import evaluate
from dscoder.eval.sandbox import Sandbox
from dscoder.eval.tasks import extract_answer, fim, first_line, same_number

GSM8K = SHARED_DATA / "gsm8k" / "test.json"
HUMANEVAL_X = SHARED_DATA / "humaneval-x"


def _rows(out: Path) -> dict[str, dict]:
    return {r["task_id"]: r for r in jsonl_rows(out / "results.jsonl")}


# ----- FIM -------------------------------------------------------------------------------------------------------------
def test_fim_problems_hide_one_line_of_the_canonical_solution():
    problems = fim()
    assert len(problems) == 164 and [p.task_id for p in problems] == [p.task_id for p in fim()]  # fixed choice
    for p in problems:
        assert p.reference.strip() and "\n" not in p.reference
        assert p.prompt + p.reference + "\n" + p.suffix == p.data["prompt"] + p.data["canonical_solution"]
        assert p.task_id.startswith(p.data["task_id"].replace("HumanEval", "FIM/HumanEval"))


def test_fim_true_lines_score_one_and_wrong_lines_zero(tmp_path):
    problems = fim()
    # the true line followed by more text: only the first generated line counts
    truth = [(p.task_id, p.reference + "\n" + "    garbage that is never run(\n") for p in problems]
    summary = evaluate("fim", tmp_path / "true", samples=samples_file(tmp_path / "t.jsonl", truth))
    assert summary["problems"] == 164 and summary["exact_match"] == 1.0 and summary["pass@1"] == 1.0
    assert summary["prompt_version"] == "1"
    wrong = [(p.task_id, "    return None  # " + p.reference.strip()) for p in problems[:20]]
    summary = evaluate("fim", tmp_path / "wrong", samples=samples_file(tmp_path / "w.jsonl", wrong), limit=20)
    assert summary["exact_match"] == 0.0 and summary["pass@1"] < 0.5
    row = next(iter(_rows(tmp_path / "wrong").values()))
    assert row["metrics"] == {"exact_match": False} and "def check" in row["program"]
    assert first_line("  x = 1\n  y = 2") == "  x = 1"


# ----- GSM8K -----------------------------------------------------------------------------------------------------------
def test_gsm8k_answer_extraction():
    assert extract_answer("so 3 + 4 = 7 apples. The answer is 7.") == "7"
    assert extract_answer("She pays $1,234.50 in total.\n#### 1,234.50") == "1234.50"
    assert extract_answer("x = 2, y = 3, the final result is \\boxed{$42} and 5 more") == "42"
    assert extract_answer("The answer is: -3 degrees, not 10") == "-3"
    assert extract_answer("We get 12 then 18.") == "18"  # the last number
    assert extract_answer("no numbers here") is None
    assert same_number("18.0", "18") and same_number("0.5", ".5") and not same_number("18", "19")
    assert not same_number(None, "1")


def _gsm8k_file(path: Path) -> Path:
    rows = [{"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7", "idx": 0},
            {"question": "A pen costs $2. How much do 600 pens cost?",
             "answer": "600 * 2 = <<600*2=1200>>1200\n#### 1,200", "idx": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_gold_answers_score_one_and_wrong_ones_zero(tmp_path):
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    gold = [("GSM8K/0", " 3 + 4 = 7. The answer is 7.\n\nQuestion: next one, answer 99"),
            ("GSM8K/1", " 600 pens cost 600 * 2 = 1,200 dollars. The answer is 1,200.")]
    summary = evaluate("gsm8k", tmp_path / "gold", samples=samples_file(tmp_path / "g.jsonl", gold), gsm8k_path=data)
    assert summary["exact_match"] == 1.0 and summary["problems"] == 2 and summary["sandbox"]
    wrong = [("GSM8K/0", " The answer is 8."), ("GSM8K/1", " 600 * 2 = 1200, minus 1 is 1199")]
    summary = evaluate("gsm8k", tmp_path / "wrong", samples=samples_file(tmp_path / "w.jsonl", wrong), gsm8k_path=data)
    assert summary["exact_match"] == 0.0 and summary["not_passed"] == {"failed": 2}
    chat = [("GSM8K/0", "Step by step... so \\boxed{7}"), ("GSM8K/1", "\\boxed{1200}")]
    summary = evaluate("gsm8k", tmp_path / "chat", samples=samples_file(tmp_path / "c.jsonl", chat), gsm8k_path=data,
                       style="instruct")
    assert summary["exact_match"] == 1.0


@pytest.mark.skipif(not GSM8K.exists(), reason="no shared GSM8K data")
def test_gsm8k_shared_file_gold_answers(tmp_path):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:50]]
    gold = [(f"GSM8K/{r['idx']}", r["answer"]) for r in rows]  # the dataset's own solutions ("#### N")
    summary = evaluate("gsm8k", tmp_path / "o", samples=samples_file(tmp_path / "s.jsonl", gold), gsm8k_path=GSM8K,
                       limit=50)
    assert summary["problems"] == 50 and summary["exact_match"] == 1.0


def test_gsm8k_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    s = samples_file(tmp_path / "s.jsonl", [("GSM8K/0", "1")])
    assert main(["eval", "gsm8k", "--gsm8k", str(bad), "--samples", str(s), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: expected a GSM8K record" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--samples", str(s), "--out", str(tmp_path / "o")]) == 2
    assert "needs --gsm8k PATH" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--gsm8k", str(tmp_path / "none.json"), "--samples", str(s),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such GSM8K file" in capsys.readouterr().err


# ----- NIAH ------------------------------------------------------------------------------------------------------------
def test_niah_problems_place_the_needle():
    problems = niah.problems([128, 256], [0, 50, 100], seed=3)
    assert [p.task_id for p in problems] == [f"NIAH/{n}/{d}" for n in (128, 256) for d in (0, 50, 100)]
    for p in problems:
        needle = niah.NEEDLE.format(secret=p.data["secret"])
        assert p.prompt.count(needle) == 1 and p.prompt.endswith(niah.QUESTION)
        assert p.data["secret"] == niah.secret(3, p.data["length"], p.data["depth"])
        at = p.prompt.index(needle)
        filler = p.prompt[:-len(niah.QUESTION)].replace(needle + "\n", "", 1)
        depth_at = int(len(filler) * p.data["depth"] / 100)
        # at the start of the line that holds the depth point
        assert at <= depth_at and "\n" not in filler[at:depth_at].rstrip("\n") and (at == 0 or filler[at - 1] == "\n")
        assert len(p.prompt) <= p.data["length"] * niah.CHARS_PER_TOKEN
    assert problems[0].metrics(f" {problems[0].data['secret']}.") == {"correct": True}
    assert problems[0].metrics(" 1234567") == {"correct": False}


def test_niah_grid_heatmap_and_skipped_lengths(tmp_path, capsys):
    lengths, depths = (128, 256, 512), (0, 50, 100)
    # a stub model: right at depth 0 everywhere and at 256 tokens, wrong elsewhere
    rows = [(niah.task_id(n, d), f" {niah.secret(0, n, d) if d == 0 or n == 256 else '1234567'}.")
            for n in lengths[:2] for d in depths]
    samples = samples_file(tmp_path / "s.jsonl", rows)
    code = main(["eval", "niah", "--samples", str(samples), "--out", str(tmp_path / "o"), "--niah-lengths",
                 "128,256,512", "--niah-depths", "0,50,100", "--context", "300"])
    assert code == 0
    out = capsys.readouterr()
    assert "context length 512 skipped: the model holds 300 tokens" in out.err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["grid"] == {"lengths": [128, 256, 512], "depths": [0, 50, 100],
                               "scores": [[1.0, 1.0, None], [0.0, 1.0, None], [0.0, 1.0, None]]}
    assert summary["accuracy"] == pytest.approx(4 / 6) and "512" in summary["skipped"]
    png = tmp_path / "o" / "niah.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["heatmap"] == str(png)


class _StubEngine:
    """Stands in for dscoder's Engine: finds the needle only in the first half of the context."""

    tokenizer = None
    model = None

    def generate(self, prompt, **kw):
        secret = re.search(r"The secret number is (\d+)\.", prompt).group(1)
        found = prompt.index("The secret number is") < len(prompt) / 2
        return type("Completion", (), {"text": f" {secret if found else '0'}."})()


def test_niah_with_a_generate_function(tmp_path):
    summary = evaluate("niah", tmp_path / "o", engine=_StubEngine(), niah_lengths=(128, 256),
                       niah_depths=(0, 25, 75, 100))
    assert summary["grid"]["scores"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert (tmp_path / "o" / "niah.png").exists()


# ----- MultiPL-E -------------------------------------------------------------------------------------------------------
# hand-written completions of HumanEval_23_strlen (and _53_add) per language: (correct, wrong)
STRLEN = {
    "sh": ('    echo "${#1}"\n', '    echo 0\n'),
    "js": ("  return string.length;\n}\n", "  return 1;\n}\n"),
    "cpp": ("    return string.size();\n", "    return string.size() + 1;\n"),
    "java": ("        return string.length();\n", "        return 0l;\n"),
    "rs": ("    string.len() as isize\n", "    1\n"),
}
ADD = {"sh": ('    echo $(( $1 + $2 ))\n', '    echo $(( $1 - $2 ))\n'),
       "js": ("  return x + y;\n}\n", "  return x * y;\n}\n")}
TOOL = {"sh": "bash", "js": "node", "cpp": "g++", "java": "java", "rs": "rustc"}


def test_sandbox_runs_a_command_with_the_program_in_its_working_dir():
    sandbox = Sandbox(workers=2)
    ok = sandbox.run('echo "hello from $0"\n[[ -f main.sh ]]\n', {"file": "main.sh", "command": "{bash} main.sh",
                                                                  "tools": {"bash": shutil.which("bash")}})
    assert ok.passed and "hello from main.sh" in ok.stdout
    bad = sandbox.run("exit 3\n", {"file": "main.sh", "command": "bash main.sh"})
    assert bad.status == "failed"
    # a program cannot print its way to a pass: the harness's nonce is not in its reach
    fake = sandbox.run("echo; echo passed\n", {"file": "main.sh", "command": "bash main.sh; exit 1"})
    assert fake.status == "failed"
    with pytest.raises(DscoderError, match="bad file name"):
        sandbox.run("x", {"file": "../x.sh", "command": "bash x.sh"})


def test_multipl_e_from_a_handmade_file(tmp_path, capsys):
    data = tmp_path / "hx"
    data.mkdir()
    (data / "humaneval-sh.jsonl").write_text(json.dumps({
        "name": "HumanEval_0_double", "prompt": "#!/bin/bash\n# Double $1\ndouble() {\n", "stop_tokens": ["\n}"],
        "tests": '}\n\nset -e\n[[ $(double "4") = "8" ]]\n[[ $(double "0") = "0" ]]\n'}) + "\n")
    samples = samples_file(tmp_path / "s.jsonl", [("sh/HumanEval_0_double", "    echo $(( $1 * 2 ))\n}\nrm -rf x\n"),
                                                  ("sh/HumanEval_0_double", "    echo $(( $1 + 2 ))\n")])
    summary = evaluate("multipl-e", tmp_path / "o", samples=samples, humaneval_x=data, languages=["sh", "php"],
                       n=2, ks=(1, 2))
    assert summary["languages"] == {"sh": {"problems": 1, "pass@1": 0.5, "pass@2": 1.0}}
    assert "PHP skipped" in summary["skipped"]["php"] and "PHP skipped" in capsys.readouterr().err
    program = _rows(tmp_path / "o")["sh/HumanEval_0_double"]["program"]
    assert "rm -rf" not in program  # cut at the stop token, as MultiPL-E does
    with pytest.raises(DscoderError, match="unknown language 'cobol'"):
        evaluate("multipl-e", tmp_path / "o", samples=samples, humaneval_x=data, languages=["cobol"])
    (data / "humaneval-js.jsonl").write_text('{"name": "x"}\n')
    if shutil.which("node"):
        with pytest.raises(DscoderError, match="humaneval-js.jsonl:1: expected a MultiPL-E record"):
            evaluate("multipl-e", tmp_path / "o", samples=samples, humaneval_x=data, languages=["js"])


@pytest.mark.skipif(not HUMANEVAL_X.exists(), reason="no shared MultiPL-E data")
def test_multipl_e_hand_written_solutions_pass_and_wrong_ones_fail(tmp_path, monkeypatch):
    import dscoder.eval.multipl_e as me

    langs = [lang for lang in STRLEN if shutil.which(TOOL[lang])]
    assert "sh" in langs
    rows = []
    for lang in langs:
        right, wrong = STRLEN[lang]
        rows += [(f"{lang}/HumanEval_23_strlen", right), (f"{lang}/HumanEval_23_strlen", wrong)]
        if lang in ADD:
            rows += [(f"{lang}/HumanEval_53_add", ADD[lang][0]), (f"{lang}/HumanEval_53_add", ADD[lang][1])]
    samples = samples_file(tmp_path / "s.jsonl", rows)
    real_which = shutil.which
    monkeypatch.setattr(me.shutil, "which", lambda t: None if t == "php" else real_which(t))
    summary = evaluate("multipl-e", tmp_path / "o", samples=samples, humaneval_x=HUMANEVAL_X,
                       languages=[*langs, "php"], n=2)
    results = jsonl_rows(tmp_path / "o" / "results.jsonl")
    unexpected = {(r["task_id"], r["sample"]): r["reason"] for r in results if r["passed"] != (r["sample"] == 0)}
    assert len(results) == len(rows) and not unexpected  # sample 0 is the right one, sample 1 the wrong one
    assert set(summary["languages"]) == set(langs)
    assert all(part["pass@1"] == 0.5 for part in summary["languages"].values())
    assert "'php' not found" in summary["skipped"]["php"]
