"""Needle In A Haystack: can the model find one sentence anywhere in a long context?

A grid of context lengths (tokens) × needle depths (% of the context). The haystack is deterministic filler text:
the Python standard library's own source files of this machine, in sorted order (or any file or folder given), so
nothing is downloaded. Each cell gets its own secret (a 7-digit number drawn from the seed, the length and the
depth) in the needle sentence "The secret number is N.", put on its own line at a line start near the depth
(gkamradt's harness moves the needle back to a sentence start; code has lines instead). The prompt ends with a
question and the answer's opening words; the cell scores 1 when the secret is among the numbers of the answer
(a deterministic match replacing the original harness's LLM judge). The grid is drawn as ``niah.png``.
"""

from __future__ import annotations

import random
import re
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import LoadContext, Option, Problem, Task, number_list
from dscoder.io import atomic_write

DEFAULT_LENGTHS = (256, 512, 1024)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
NEEDLE = "The secret number is {secret}."
QUESTION = "\n\nQuestion: What is the secret number in the text above?\nAnswer: The secret number is"
ANSWER_TOKENS = 16
CHARS_PER_TOKEN = 4  # the length of a cell when no tokenizer is at hand (samples, endpoints)


def secret(seed: int, length: int, depth: int) -> str:
    return str(random.Random(f"niah/{seed}/{length}/{depth}").randint(1_000_000, 9_999_999))


def task_id(length: int, depth: int) -> str:
    return f"NIAH/{length}/{depth}"


@dataclass
class NIAHProblem(Problem):
    def program(self, completion: str) -> None:
        return None

    def metrics(self, completion: str) -> dict[str, bool]:
        return {"correct": self.data["secret"] in re.findall(r"\d+", completion)}


def haystack_text(source: str | Path | None, chars: int) -> str:
    """At least ``chars`` characters of filler: the stdlib's ``*.py`` files (sorted), or a file, or a folder's
    ``*.py`` files; repeated if shorter."""
    root = Path(source) if source is not None else Path(sysconfig.get_paths()["stdlib"])
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.glob("*.py")) or sorted(root.rglob("*.py"))
    else:
        raise DscoderError(f"{root}: no such file or folder for the NIAH haystack")
    parts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    text = "\n".join(parts)
    if not text.strip():
        raise DscoderError(f"{root}: no readable text for the NIAH haystack")
    return (text + "\n") * (chars // len(text) + 1) if len(text) < chars else text


def insert_needle(context: str, needle: str, depth: float) -> str:
    """The needle on its own line, at the start of the line holding ``depth`` % of the context (100: the end)."""
    if depth >= 100:
        return context.rstrip("\n") + "\n" + needle + "\n"
    pos = int(len(context) * depth / 100)
    pos = context.rfind("\n", 0, pos) + 1 if pos > 0 else 0
    return context[:pos] + needle + "\n" + context[pos:]


def problems(lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, *, seed: int = 0, haystack: str | Path | None = None,
             encode: Callable[[str], list[int]] | None = None, decode: Callable[[list[int]], str] | None = None,
             context: int | None = None, skipped: dict[str, str] | None = None) -> list[Problem]:
    """One problem per (length, depth). ``encode``/``decode`` (the model's tokenizer) size the haystack in tokens;
    without them a token counts as 4 characters. Lengths whose prompt and answer would not fit ``context`` tokens
    are skipped: a line each in ``skipped`` and on stderr."""
    try:
        lengths, depths = sorted(set(int(x) for x in lengths)), sorted(set(float(d) for d in depths))
    except (TypeError, ValueError):
        raise DscoderError(f"niah: lengths and depths must be numbers, got {lengths!r} and {depths!r}") from None
    if not lengths or not depths or lengths[0] < 32 or depths[0] < 0 or depths[-1] > 100:
        raise DscoderError("niah: lengths must be ≥ 32 tokens and depths in [0, 100]")
    skipped = {} if skipped is None else skipped
    fits = []
    for length in lengths:
        if context is not None and length + ANSWER_TOKENS > context:
            skipped[str(length)] = (f"NIAH: context length {length} skipped: the model holds {context} tokens "
                                    f"(prompt + {ANSWER_TOKENS} answer tokens)")
        else:
            fits.append(length)
    for line in skipped.values():
        print(line, file=sys.stderr)
    if not fits:
        return []
    text = haystack_text(haystack, fits[-1] * 8)
    ids = encode(text) if encode is not None else None
    count = (lambda s: len(encode(s))) if encode is not None else (lambda s: -(-len(s) // CHARS_PER_TOKEN))
    out: list[Problem] = []
    for length in fits:
        for depth in depths:
            value = secret(seed, length, int(depth) if depth.is_integer() else depth)
            needle = NEEDLE.format(secret=value)
            budget = max(length - count(needle + "\n") - count(QUESTION) - 1, 8)
            filler = decode(ids[:budget]) if ids is not None else text[:budget * CHARS_PER_TOKEN]
            d = int(depth) if depth.is_integer() else depth
            prompt = insert_needle(filler, needle, depth) + QUESTION
            out.append(NIAHProblem(task_id(length, d), prompt, stop=["\n"], reference=f" {value}.",
                                   max_tokens=ANSWER_TOKENS, data={"length": length, "depth": d, "secret": value}))
    return out


def grid(rows: list[dict], lengths, depths) -> dict:
    """{"lengths", "depths", "scores"}: scores[i][j] = mean correctness at depths[i], lengths[j] (None: not run)."""
    lengths = sorted(set(int(x) for x in lengths))
    depths = [int(d) if float(d).is_integer() else float(d) for d in sorted(set(float(d) for d in depths))]
    cells: dict[tuple[int, float], list[bool]] = {}
    for row in rows:
        _, length, depth = row["task_id"].split("/")
        cells.setdefault((int(length), float(depth)), []).append(bool(row["passed"]))
    scores = [[(sum(v) / len(v)) if (v := cells.get((length, float(depth)))) else None for length in lengths]
              for depth in depths]
    return {"lengths": lengths, "depths": depths, "scores": scores}


def plot(g: dict, path: str | Path, title: str = "Needle In A Haystack") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = np.array([[np.nan if s is None else s for s in row] for row in g["scores"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(g["lengths"]), 1.0 + 0.45 * len(g["depths"])))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]])
    ax.set_yticks(range(len(g["depths"])), [f"{d}%" for d in g["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


class NIAHTask(Task):
    name = "niah"
    help = "Needle In A Haystack over context lengths x depths: accuracy grid and heatmap (nothing executed)"
    options = (Option("niah_lengths", "--niah-lengths", "context lengths in tokens",
                      default=DEFAULT_LENGTHS, parse=number_list("--niah-lengths"), metavar="N,N"),
               Option("niah_depths", "--niah-depths", "needle depths in %%", default=DEFAULT_DEPTHS,
                      parse=number_list("--niah-depths", float), metavar="D,D"),
               Option("niah_haystack", "--niah-haystack", "filler text: a file or folder (default: this Python's "
                      "standard library)", metavar="PATH"))
    executes = False

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        options = super().resolve(given)
        try:
            lengths = tuple(sorted(set(int(x) for x in options["niah_lengths"])))
            depths = tuple(sorted(set(float(d) for d in options["niah_depths"])))
        except (TypeError, ValueError):
            lengths = depths = ()
        if (not lengths or not depths or lengths[0] < 32 or not all(0 <= d <= 100 for d in depths)):
            raise DscoderError("niah: lengths must be numbers ≥ 32 (tokens) and depths numbers in [0, 100] (%), "
                               f"got {options['niah_lengths']!r} and {options['niah_depths']!r}")
        return {**options, "niah_lengths": lengths,
                "niah_depths": tuple(int(d) if d.is_integer() else d for d in depths)}

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        tok = ctx.tokenizer
        encode = (lambda text: tok.encode(text)) if tok is not None else None
        decode = (lambda ids: tok.decode(ids)) if tok is not None else None
        return problems(options["niah_lengths"], options["niah_depths"], seed=ctx.seed,
                        haystack=options["niah_haystack"], encode=encode, decode=decode, context=ctx.context,
                        skipped=ctx.skipped)

    def cache_tokens(self, options: dict[str, Any], context: int | None) -> int | None:
        need = max(options["niah_lengths"]) + ANSWER_TOKENS
        return need if context is None else min(context, need)

    def wants_context(self) -> bool:
        return True

    def is_skipped(self, task_id: str, skipped: dict[str, str]) -> bool:
        parts = task_id.split("/")
        return len(parts) == 3 and parts[1] in skipped

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        g = grid(list(rows.values()), options["niah_lengths"], options["niah_depths"])
        summary["grid"] = g
        summary["accuracy"] = summary.pop("pass@1", None)
        if rows:
            plot(g, out / "niah.png")
            summary["heatmap"] = str(out / "niah.png")
