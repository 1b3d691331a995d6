"""EvalPlus's HumanEval+ and MBPP+ (Liu et al. 2023), scored by EvalPlus's rules in dscoder's sandbox.

Rows in EvalPlus's format (jsonl, jsonl.gz or the Hub's parquet): task_id, prompt, entry_point, canonical_solution,
base_input, plus_input, atol. The rules, as EvalPlus's source has them (evalplus/evalplus):

- evalplus/evaluate.py, ``get_groundtruth``: the expected outputs are the canonical solution's (prompt +
  canonical_solution) on each input, with its runtime per input; here the canonical solution runs in the sandbox too
  (:meth:`EvalPlusTask.prepare`), so the reference times are this machine's, as EvalPlus measures them.
- evalplus/eval/__init__.py, ``untrusted_check``: a time limit per input of max(floor, factor × the reference's
  time) (evalplus/config.py: DEFAULT_MIN_TIME_LIMIT 4.0 s, DEFAULT_GT_TIME_LIMIT_FACTOR 4.0) and the whole check
  within min(60, the sum of the limits) + 2 s; ``unsafe_execute``: ``out == expected``, else, when atol is set (or
  the expected value is a float or a list of floats, then atol 1e-6 from there on), same type, same length and
  ``np.allclose(out, exp, rtol=1e-7, atol)``; special oracles for HumanEval's find_zero (``|poly(xs, out)| <= atol``)
  and for MBPP+'s set-valued and not-None tasks, are_equivalent and sum_div (eval/_special_oracle.py).
- evaluate.py: base and plus are checked apart; ``base_pass@k`` counts the base inputs, ``pass@k`` both.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import (HUMANEVAL_INSTRUCT, PROBLEMS, STYLE, LoadContext, Option, Problem, Task, instruct_body,
                               pass_at_k, strip_code_block)

MIN_TIME_LIMIT = 4.0  # evalplus/config.py
TIME_LIMIT_FACTOR = 4.0
TASK_TIMEOUT = 60.0  # EVALPLUS_TIMEOUT_PER_TASK's default
# evalplus/eval/_special_oracle.py
MBPP_SET_EQ = frozenset(("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                         "larg_nnum", "intersection_array", "find_dissimilar", "Diff"))
MBPP_NOT_NONE = frozenset(("check_str", "text_match_three", "text_starta_endb"))
# EvalPlus's instruction for chat models (evalplus/provider/utility.py, make_raw_chat_prompt)
MBPP_INSTRUCT = ("Please provide a self-contained Python script that solves the following problem in a markdown "
                 "code block:\n```\n{prompt}\n```\n")

# the canonical solution's run: its outputs and its time per input (the checker's clock, pipe included)
GROUND_TRUTH = """import time
RESULT = [[], []]
for args in DATA:
    t0 = time.perf_counter()
    out = ENTRY(*args)
    RESULT[1].append(time.perf_counter() - t0)
    RESULT[0].append(out)
"""

# a candidate's check, base inputs then plus inputs; PROGRESS says whether the base inputs all passed
CHECK = """import math
PROGRESS = {"base": False}


def is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, float) for i in x)


def close(a, b, atol):
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)):
            raise TypeError("shapes differ")
        return all(close(x, y, atol) for x, y in zip(a, b))
    a, b = complex(a) if isinstance(a, complex) else float(a), complex(b) if isinstance(b, complex) else float(b)
    if a == b:
        return True
    return abs(a - b) <= atol + 1e-07 * abs(b)


def poly(xs, x):
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def judge(args, out, exp, atol):
    if MODE == "find_zero":
        return abs(poly(*args, out)) <= atol, atol
    exact = out == exp
    if MODE == "are_equivalent":
        exact = True
    elif MODE == "sum_div":
        exact = exact or out == 0
    elif MODE == "set_eq":
        exact = set(out) == set(exp)
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        ok = type(out) == type(exp) and (not isinstance(exp, (list, tuple)) or len(out) == len(exp)) \\
            and close(out, exp, atol)
        return ok, atol
    return bool(exact), atol


def run(part):
    atol = DATA["atol"]
    for i, (args, exp, limit) in enumerate(DATA[part]):
        time_limit(limit)
        out = ENTRY(*args)
        time_limit(None)
        try:
            ok, atol = judge(args, out, exp, atol)
        except Exception:
            ok = False
        if not ok:
            shown = repr(out)
            raise AssertionError("%s input %d: wrong output %s" % (part, i, shown[:120]))


run("base")
PROGRESS["base"] = True
run("plus")
"""


def _mode(dataset: str, entry: str) -> str:
    if dataset == "humaneval" and entry == "find_zero":
        return "find_zero"
    if dataset == "mbpp":
        if entry == "are_equivalent":
            return "are_equivalent"
        if entry == "sum_div":
            return "sum_div"
        if entry in MBPP_SET_EQ:
            return "set_eq"
    return "plain"


def _shim(source: str, entry: str, not_none: str | None) -> tuple[str, str]:
    """MBPP+'s not-None tasks return values that are not plain data (re.Match): the candidate's side turns them into
    what EvalPlus compares (``out is not None``, a bool as itself) before they cross the sandbox."""
    if not not_none:
        return source, entry
    name = "dscoder_evalplus_entry"
    body = "r if type(r) is bool else r is not None" if not_none == "candidate" else "r is not None"
    return source + f"\n\ndef {name}(*args):\n    r = {entry}(*args)\n    return {body}\n", name


@dataclass
class EvalPlusProblem(Problem):
    """``data``: the EvalPlus row plus ``dataset`` (humaneval | mbpp) and, after :meth:`EvalPlusTask.prepare`,
    ``expected`` {base, plus: [(output, time limit)]}."""

    def candidate_source(self, completion: str) -> str:
        entry = self.data["entry_point"]
        if self.chat:
            return instruct_body(completion, entry) + "\n"
        if self.data["dataset"] == "mbpp":
            return self.data["prompt"] + strip_code_block(completion) + "\n"
        return self.data["prompt"] + completion + "\n"

    def program(self, completion: str) -> tuple[str, dict]:
        if "expected" not in self.data:
            raise DscoderError(f"{self.task_id}: expected outputs not computed (EvalPlusTask.prepare runs first)")
        entry = self.data["entry_point"]
        not_none = "candidate" if self.data["dataset"] == "mbpp" and entry in MBPP_NOT_NONE else None
        source, called = _shim(self.candidate_source(completion), entry, not_none)
        exp = self.data["expected"]
        data = {"atol": self.data["atol"],
                "base": [[args, out, limit] for args, (out, limit) in zip(self.data["base_input"], exp["base"])],
                "plus": [[args, out, limit] for args, (out, limit) in zip(self.data["plus_input"], exp["plus"])]}
        whole = sum(min(TASK_TIMEOUT, sum(limit for _, limit in exp[part])) + 2 for part in ("base", "plus")) + 1
        tests = f"ENTRY = {called}\nMODE = {_mode(self.data['dataset'], entry)!r}\n" + CHECK
        return source, {"tests": tests, "entry_point": called, "data": data, "collect": "PROGRESS",
                        "timeout_s": whole}

    def result_metrics(self, result) -> dict[str, bool]:
        collected = getattr(result, "collected", None)
        base = bool(result.passed) or (isinstance(collected, dict) and collected.get("base") is True)
        return {"base_passed": base}


def _inputs(value, where: str, field: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DscoderError(f"{where}: {field} is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
        raise DscoderError(f"{where}: {field} is not a list of argument lists")
    return value


def load_problems(paths: list[Path], dataset: str, style: str) -> list[EvalPlusProblem]:
    from dscoder.eval.fetch import read_rows

    out = []
    for path in paths:
        for i, row in read_rows(path, "EvalPlus"):
            where = f"{path}:{i}"
            try:
                task_id, prompt, entry = str(row["task_id"]), row["prompt"], row["entry_point"]
                canonical = row["canonical_solution"]
                atol = float(row.get("atol") or 0)
                if not all(isinstance(x, str) for x in (prompt, entry, canonical)) or not math.isfinite(atol):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise DscoderError(f"{where}: not an EvalPlus record (task_id, prompt, entry_point, "
                                   f"canonical_solution, base_input, plus_input, atol)") from None
            data = {"dataset": dataset, "prompt": prompt, "entry_point": entry, "canonical_solution": canonical,
                    "atol": atol, "base_input": _inputs(row.get("base_input"), where, "base_input"),
                    "plus_input": _inputs(row.get("plus_input", []), where, "plus_input")}
            if style == "instruct":
                text = (HUMANEVAL_INSTRUCT if dataset == "humaneval" else MBPP_INSTRUCT).format(prompt=prompt.strip())
                out.append(EvalPlusProblem(task_id, text, chat=True, data=data,
                                           reference="```python\n" + prompt + canonical + "\n```"))
            else:
                stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"] if dataset == "humaneval" \
                    else ["\nassert", '\n"""', "\nif __name__", "\nprint("]
                out.append(EvalPlusProblem(task_id, prompt, stop=stop, data=data, reference=canonical))
    if not out:
        raise DscoderError(f"{', '.join(map(str, paths))}: no EvalPlus records")
    return out


TIME_OPTIONS = (
    Option("min_time_limit", "--min-time-limit", "EvalPlus: the floor of the time limit per input, seconds (4)",
           default=MIN_TIME_LIMIT, parse=float, metavar="S"),
    Option("time_limit_factor", "--time-limit-factor", "EvalPlus: time limit per input = max(floor, this × the "
           "canonical solution's time on this machine) (4)", default=TIME_LIMIT_FACTOR, parse=float, metavar="X"),
)


class EvalPlusTask(Task):
    dataset = ""
    options = (PROBLEMS, STYLE, *TIME_OPTIONS)

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        from dscoder.eval.fetch import problem_files

        for name in ("min_time_limit", "time_limit_factor"):
            value = options[name]
            if not isinstance(value, (int, float)) or not 0 < value < 3600:
                raise DscoderError(f"--{name.replace('_', '-')} {value!r}: expected a number between 0 and 3600")
        self.limits = (float(options["min_time_limit"]), float(options["time_limit_factor"]))
        return load_problems(problem_files(self.name, options["problems"]), self.dataset, options["style"])

    def prepare(self, problems: list[Problem], sandbox) -> None:
        """Run each canonical solution in the sandbox on the base and plus inputs: the expected outputs, and each
        input's time limit from the canonical solution's time."""
        floor, factor = getattr(self, "limits", (MIN_TIME_LIMIT, TIME_LIMIT_FACTOR))
        todo = [p for p in problems if "expected" not in p.data]
        jobs = []
        for p in todo:
            entry = p.data["entry_point"]
            not_none = "truth" if p.data["dataset"] == "mbpp" and entry in MBPP_NOT_NONE else None
            source, called = _shim(p.data["prompt"] + p.data["canonical_solution"] + "\n", entry, not_none)
            inputs = p.data["base_input"] + p.data["plus_input"]
            jobs.append((source, {"tests": f"ENTRY = {called}\n" + GROUND_TRUTH, "entry_point": called,
                                  "data": inputs, "collect": "RESULT", "timeout_s": 60 + 10 * len(inputs)}))
        for p, result in zip(todo, sandbox.run_many(jobs)):
            got = result.collected
            n = len(p.data["base_input"])
            if not result.passed or not (isinstance(got, list) and len(got) == 2
                                         and len(got[0]) == len(got[1]) == n + len(p.data["plus_input"])):
                raise DscoderError(f"{self.name} {p.task_id}: the canonical solution failed in the sandbox "
                                   f"({result.verdict}: {result.reason or 'no outputs'}); fix the problems file")
            pairs = [(out, max(floor, factor * t)) for out, t in zip(*got)]
            p.data["expected"] = {"base": pairs[:n], "plus": pairs[n:]}

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        per: dict[str, list[bool]] = defaultdict(list)
        for (task_id, _), row in sorted(rows.items()):
            per[task_id].append(bool((row.get("metrics") or {}).get("base_passed", row["passed"])))
        summary.pop("base_passed", None)
        for k in ks:
            if per and all(len(v) >= k for v in per.values()):
                summary[f"base_pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per.values()) / len(per)
        summary["time_limits"] = {"floor_s": options["min_time_limit"], "factor": options["time_limit_factor"]}


class HumanEvalPlusTask(EvalPlusTask):
    name = "humaneval+"
    dataset = "humaneval"
    help = "EvalPlus HumanEval+: base_pass@k and pass@k (base + plus inputs), EvalPlus's time limits"


class MBPPPlusTask(EvalPlusTask):
    name = "mbpp+"
    dataset = "mbpp"
    help = "EvalPlus MBPP+: base_pass@k and pass@k (base + plus inputs), EvalPlus's time limits"
