"""LiveCodeBench code generation (Jain et al. 2024), scored as its own harness scores it, in dscoder's sandbox.

Problems come in the format of LiveCodeBench's ``code_generation_lite`` release files (jsonl rows: question_id,
question_content, platform, contest_date, difficulty, starter_code, public_test_cases and private_test_cases as
JSON, the private ones possibly base64(zlib(pickle(JSON))), metadata as JSON with ``func_name`` for functional
problems). The rules, as LiveCodeBench's source has them (LiveCodeBench/LiveCodeBench):

- lcb_runner/benchmarks/code_generation.py: the tests are the public then the private ones; a problem is functional
  when its metadata has ``func_name``; ``--start-date``/``--end-date`` keep problems with
  start <= contest_date <= end, the dates read as midnight (``load_code_generation_dataset``).
- lcb_runner/evaluation/testing_util.py: the import preamble before the code; functional tests call
  ``Solution().func_name(*args)`` (one instance for all tests) with one JSON value per input line, a returned tuple
  compared as a list, ``==`` against the JSON output; stdin tests compare the stripped output's stripped lines, equal
  as text or as Decimals; SystemExit ends a program normally; the first failing test ends the sample; a timeout per
  test (6 s by default, compute_code_generation_metrics.py) and a whole-sample limit of (timeout + 1) × tests + 5 s.
- lcb_runner/prompts/code_generation.py and lcb_runner/utils/extraction_utils.py: the prompts and the code taken
  from an answer (the last fenced block of a chat answer; a base model's whole answer).

Private tests are never unpickled: the pickle is read opcode by opcode and admitted only when it is one string
(:func:`decode_private`); anything else is refused with a line naming the problem, and nothing in it runs.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import pickletools
import zlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import PROBLEMS, STYLE, LoadContext, Option, Problem, Task, pass_at_k

# testing_util.py's import_string (standard-library star imports, then the modules, then the recursion limit)
PRELUDE_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                   "statistics", "itertools", "functools", "operator", "io", "sys", "json")
PRELUDE = ("".join(f"from {m} import *\n" for m in (*PRELUDE_MODULES, "builtins", "typing"))
           + "".join(f"import {m}\n" for m in PRELUDE_MODULES) + "sys.setrecursionlimit(50000)\n")
TEST_TIMEOUT = 6.0
MAX_PRIVATE_BYTES = 1 << 30  # a decompressed private-test blob larger than this is refused (a zip bomb)

# lcb_runner/prompts/code_generation.py, PromptConstants and get_generic_question_template_answer (chat models)
WITH_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your "
                "code within delimiters.")
WITHOUT_STARTER = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
                   "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python "
                   "program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.")
# base models: LiveCodeBench's one-shot layout (### Question / ### Starter Code / ### Answer) with examples written
# for dscoder
BASE_STDIN_SHOT = ("Given two integers A and B on one line, print A + B.", "",
                   "A, B = map(int, input().split())\nprint(A + B)")
BASE_FUNC_SHOT = ("Given a list of integers nums, return the largest value in it.",
                  "class Solution:\n    def largest(self, nums: List[int]) -> int:\n        ",
                  "class Solution:\n    def largest(self, nums: List[int]) -> int:\n        return max(nums)")


def instruct_prompt(question: str, starter: str) -> str:
    text = f"### Question:\n{question}\n\n"
    if starter:
        text += f"### Format: {WITH_STARTER}\n```python\n{starter}\n```\n\n"
    else:
        text += f"### Format: {WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return text + "### Answer: (use the provided format with backticks)\n\n"


def base_prompt(question: str, starter: str) -> str:
    def block(q: str, code: str, answer: str) -> str:
        text = f"### Question\n{q}\n\n"
        if starter:
            text += f"### Starter Code\n{code}\n\n"
        return text + "### Answer\n\n" + (answer + "\n\n" if answer else "")

    shot = BASE_FUNC_SHOT if starter else BASE_STDIN_SHOT
    return block(*shot) + block(question, starter, "")


def extract_code(completion: str, chat: bool) -> str:
    """extraction_utils.py's rule: a base model's answer whole (stripped); a chat answer's code between the last two
    lines holding ``` (none when there are fewer than two)."""
    if not chat:
        return completion.strip()
    lines = completion.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return ""
    return "\n".join(lines[fences[-2] + 1:fences[-1]])


# ----- private tests: JSON, or base64(zlib(pickle(JSON))) read without unpickling anything but one string ----------
_STRING_OPS = frozenset(("PROTO", "FRAME", "STOP", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET",
                         "LONG_BINGET", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"))


class _NoGlobals(pickle.Unpickler):
    """Refuses every global (no class, no function): with the opcode check before it, only a string comes out."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} refused")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id refused")


def decode_private(text: str, where: str) -> list:
    """The private tests of one problem: a JSON list, or base64 → zlib → a pickle of one JSON string. A pickle with any
    opcode beyond those a lone string needs (GLOBAL, REDUCE, BUILD, ...) is refused before anything is built."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            blob = zlib.decompressobj().decompress(base64.b64decode(text.encode("ascii"), validate=True),
                                                   MAX_PRIVATE_BYTES)
        except (ValueError, zlib.error, UnicodeEncodeError):
            raise DscoderError(f"{where}: private_test_cases is neither JSON nor base64(zlib(pickle))") from None
        try:
            for op, _, _ in pickletools.genops(blob):
                if op.name not in _STRING_OPS:
                    raise DscoderError(f"{where}: private_test_cases is a pickle that is not a plain string (opcode "
                                       f"{op.name}); refused, nothing in it was run")
            value = _NoGlobals(io.BytesIO(blob)).load()
        except (ValueError, pickle.UnpicklingError, EOFError) as e:
            raise DscoderError(f"{where}: private_test_cases is not a readable pickle ({e})") from None
        if not isinstance(value, str):
            raise DscoderError(f"{where}: private_test_cases' pickle holds a {type(value).__name__}, not a string")
        try:
            value = json.loads(value)
        except ValueError:
            raise DscoderError(f"{where}: private_test_cases' string is not JSON") from None
    if not isinstance(value, list):
        raise DscoderError(f"{where}: private_test_cases is not a list of tests")
    return value


# ----- problems -----------------------------------------------------------------------------------------------------
@dataclass
class LCBProblem(Problem):
    """``data``: ``tests`` [(input, output)], ``func_name`` (functional) or None (stdin), ``difficulty``,
    ``timeout`` (seconds per test)."""

    def program(self, completion: str) -> tuple[str, dict]:
        code = extract_code(completion, self.chat)
        tests, timeout = self.data["tests"], self.data["timeout"]
        whole = (timeout + 1) * len(tests) + 5  # compute_code_generation_metrics.py's global timeout
        fn = self.data["func_name"]
        if fn is None:
            return PRELUDE + "\n" + code + "\n", {"stdio": [list(t) for t in tests], "test_timeout": timeout,
                                                   "timeout_s": whole, "warm": PRELUDE_MODULES}
        source = PRELUDE + "\n\n" + code + "\n"
        entry = fn
        if "class Solution" in code:  # testing_util.compile_code: one Solution() for every test
            entry = "dscoder_lcb_entry"
            source += (f"\n\ndscoder_lcb_solution = Solution()\n\n\ndef {entry}(*args):\n"
                       f"    return dscoder_lcb_solution.{fn}(*args)\n")
        checks = (f"for i, (args, want) in enumerate(DATA):\n"
                  f"    time_limit({timeout!r})\n"
                  f"    got = {entry}(*args)\n"
                  f"    if isinstance(got, tuple):\n"
                  f"        got = list(got)\n"
                  f"    if got != want:\n"
                  f"        shown = repr(got)\n"
                  f"        raise AssertionError('test %d: wrong answer: returned %s, expected %r' % "
                  f"(i, shown[:120], want))\n")
        data = [[args, want] for args, want in self.data["parsed"]]
        return source, {"tests": checks, "entry_point": entry, "data": data, "timeout_s": whole}


def _date(flag: str):
    def parse(text: str) -> datetime:
        try:
            return datetime.strptime(text, "%Y-%m-%d")
        except ValueError:
            raise DscoderError(f"{flag} {text!r}: expected a date as YYYY-MM-DD, e.g. 2023-12-01") from None
    return parse


def load_problems(paths: list[Path], style: str, start: datetime | None, end: datetime | None,
                  timeout: float, outside: set[str] | None = None) -> list[LCBProblem]:
    """The problems of the files within the date window; ``outside`` collects the task ids of those outside it."""
    out, seen = [], set()
    for path in paths:
        from dscoder.eval.fetch import read_rows

        for i, row in read_rows(path, "LiveCodeBench"):
            where = f"{path}:{i}"
            try:
                qid, content = str(row["question_id"]), row["question_content"]
                date = datetime.fromisoformat(str(row["contest_date"]))
                difficulty = str(row["difficulty"])
                starter = row.get("starter_code") or ""
                metadata = json.loads(row.get("metadata") or "{}") if isinstance(row.get("metadata") or "{}", str) \
                    else row["metadata"]
                public = json.loads(row["public_test_cases"]) if isinstance(row["public_test_cases"], str) \
                    else row["public_test_cases"]
                if not (isinstance(content, str) and isinstance(starter, str) and isinstance(metadata, dict)
                        and isinstance(public, list)):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise DscoderError(f"{where}: not a LiveCodeBench record (question_id, question_content, "
                                   f"contest_date, difficulty, public_test_cases, private_test_cases, metadata)") \
                    from None
            date = date.replace(tzinfo=None)
            if (start and date < start) or (end and date > end):
                if outside is not None:
                    outside.add(f"LCB/{qid}")
                continue
            private = row.get("private_test_cases") or "[]"
            private = decode_private(private, f"{where} ({qid})") if isinstance(private, str) else private
            try:
                tests = [(str(t["input"]), str(t["output"])) for t in [*public, *private]]
            except (KeyError, TypeError):
                raise DscoderError(f"{where} ({qid}): a test without input and output") from None
            fn = metadata.get("func_name")
            parsed = None
            if fn is not None:
                try:
                    parsed = [([json.loads(line) for line in given.split("\n")], json.loads(want))
                              for given, want in tests]
                except ValueError:
                    raise DscoderError(f"{where} ({qid}): a functional test whose input lines or output are not "
                                       f"JSON") from None
            if not tests:
                raise DscoderError(f"{where} ({qid}): no tests")
            if qid in seen:
                continue
            seen.add(qid)
            chat = style == "instruct"
            prompt = instruct_prompt(content, starter) if chat else base_prompt(content, starter)
            out.append(LCBProblem(f"LCB/{qid}", prompt, stop=[] if chat else ["\n### "], chat=chat,
                                  data={"tests": tests, "func_name": fn, "parsed": parsed, "difficulty": difficulty,
                                        "timeout": timeout, "platform": row.get("platform"),
                                        "contest_date": date.date().isoformat()}))
    return out


class LiveCodeBenchTask(Task):
    name = "livecodebench"
    help = "LiveCodeBench code generation (stdin and LeetCode problems), pass@k overall and per difficulty"
    options = (PROBLEMS,
               Option("start_date", "--start-date", "keep problems with contest_date on or after this day",
                      parse=_date("--start-date"), metavar="YYYY-MM-DD"),
               Option("end_date", "--end-date", "keep problems with contest_date up to this day (its midnight, as "
                      "LiveCodeBench compares)", parse=_date("--end-date"), metavar="YYYY-MM-DD"),
               Option("test_timeout", "--test-timeout", "seconds per test (LiveCodeBench: 6)", default=TEST_TIMEOUT,
                      parse=float, metavar="S"),
               STYLE)

    def __init__(self):
        self.difficulty: dict[str, str] = {}
        self.outside: set[str] = set()  # problems of the files outside the date window (their samples are skipped)

    def is_skipped(self, task_id: str, skipped: dict[str, str]) -> bool:
        return task_id in self.outside

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        from dscoder.eval.fetch import problem_files

        timeout = options["test_timeout"]
        self.outside = set()
        if not isinstance(timeout, (int, float)) or not 0 < timeout < 3600:
            raise DscoderError(f"--test-timeout {timeout!r}: expected seconds between 0 and 3600")
        for flag in ("start_date", "end_date"):
            if isinstance(options[flag], str):
                options[flag] = _date("--" + flag.replace("_", "-"))(options[flag])
        problems = load_problems(problem_files("livecodebench", options["problems"]), options["style"],
                                 options["start_date"], options["end_date"], float(timeout), self.outside)
        if not problems:
            raise DscoderError("livecodebench: no problem in the date window")
        self.difficulty = {p.task_id: p.data["difficulty"] for p in problems}
        return problems

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for (task_id, _), row in rows.items():
            per[self.difficulty.get(task_id, "unknown")][task_id].append(bool(row["passed"]))
        summary["difficulties"] = {}
        for level in sorted(per, key=lambda d: ("easy", "medium", "hard").index(d)
                            if d in ("easy", "medium", "hard") else 3):
            part = {"problems": len(per[level])}
            for k in ks:
                if all(len(v) >= k for v in per[level].values()):
                    part[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per[level].values()) / len(per[level])
            summary["difficulties"][level] = part
        for flag in ("start_date", "end_date"):
            if options.get(flag):
                summary[flag] = options[flag].date().isoformat()
