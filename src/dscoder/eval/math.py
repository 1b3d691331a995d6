"""MATH (Hendrycks et al. 2021) by final-answer equivalence: the answer in the last ``\\boxed{}`` of a solution, judged
equal to the reference by math-verify (Hugging Face's maintained checker: LaTeX and plain expressions parsed to
sympy, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree). Nothing is executed.

Rows: MATH's (``problem``, ``solution`` holding a ``\\boxed{}`` answer, ``level``, ``type``) or MATH-500's
(``problem``, ``answer``, ``subject``, ``level``, ``unique_id``). The instruct prompt is the DeepSeek-Coder-V2 paper's
zero-shot chain of thought (its footnote 11); the base prompt is two worked examples written for dscoder.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import PROBLEMS, STYLE, LoadContext, Problem, Task

INSTRUCT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
BASE_SHOTS = (
    ("What is $\\frac{3}{4} - \\frac{1}{4}$?",
     "$\\frac{3}{4} - \\frac{1}{4} = \\frac{2}{4} = \\frac{1}{2}$. The final answer is $\\boxed{\\frac{1}{2}}$."),
    ("Solve for $x$: $2x + 6 = 14$.",
     "Subtracting 6 gives $2x = 8$, so $x = 4$. The final answer is $\\boxed{4}$."),
)
BASE = "Problem:\n{problem}\n\nSolution:"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def equivalent(gold: str, answer: str | None) -> bool:
    """Whether ``answer`` (the model's boxed text) equals ``gold`` by math-verify (sympy underneath)."""
    if answer is None:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:
        raise DscoderError("task math needs the math-verify package (pip install math-verify==0.8.0)") from None
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    except Exception:  # math-verify's parser gave up on a malformed answer
        return answer.strip() == gold.strip()


@dataclass
class MATHProblem(Problem):
    def program(self, completion: str) -> None:
        return None

    def metrics(self, completion: str) -> dict[str, bool]:
        text = completion.split("\nProblem:")[0] if not self.chat else completion
        return {"correct": equivalent(self.data["gold"], last_boxed(text))}


def load_problems(paths: list[Path], style: str) -> list[MATHProblem]:
    from dscoder.eval.fetch import read_rows

    shots = "".join(BASE.format(problem=q) + " " + a + "\n\n" for q, a in BASE_SHOTS)
    out = []
    for path in paths:
        for i, row in read_rows(path, "MATH"):
            problem = row.get("problem")
            gold = row.get("answer")
            if gold is None and isinstance(row.get("solution"), str):
                gold = last_boxed(row["solution"])
            if not isinstance(problem, str) or not isinstance(gold, str):
                raise DscoderError(f"{path}:{i}: not a MATH record (problem, and answer or a solution with "
                                   f"\\boxed{{}})")
            task_id = f"MATH/{row.get('unique_id') or i - 1}"
            data = {"gold": gold, "level": str(row.get("level", "")), "subject": str(row.get("subject")
                                                                                     or row.get("type") or "")}
            if style == "instruct":
                out.append(MATHProblem(task_id, INSTRUCT.format(problem=problem), chat=True,
                                       reference=f"\\boxed{{{gold}}}", data=data))
            else:
                out.append(MATHProblem(task_id, shots + BASE.format(problem=problem), stop=["\nProblem:"],
                                       reference=f" The final answer is $\\boxed{{{gold}}}$.", data=data))
    if not out:
        raise DscoderError(f"{', '.join(map(str, paths))}: no MATH records")
    return out


class MATHTask(Task):
    name = "math"
    help = "MATH competition problems: boxed-answer equivalence by math-verify (nothing executed)"
    options = (PROBLEMS, STYLE)
    executes = False

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        from dscoder.eval.fetch import problem_files

        problems = load_problems(problem_files("math", options["problems"]), options["style"])
        self.subjects = {p.task_id: p.data["subject"] for p in problems}
        return problems

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        summary["accuracy"] = summary.pop("pass@1", None)
        per: dict[str, list[bool]] = defaultdict(list)
        for (task_id, _), row in rows.items():
            per[getattr(self, "subjects", {}).get(task_id, "") or "unknown"].append(bool(row["passed"]))
        summary["subjects"] = {s: sum(v) / len(v) for s, v in sorted(per.items())}
