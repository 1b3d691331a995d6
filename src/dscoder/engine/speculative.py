"""Prompt-lookup drafting: guess the next tokens of a sequence by finding its last n-gram earlier in it.

An editor asking to rewrite a function that is already in the prompt gets long stretches of the prompt back; so
does code that repeats itself. :class:`PromptLookup` indexes every n-gram of prompt + output (n = ``max_ngram``
down to ``min_ngram``) by where its most recent earlier occurrence ends, and proposes the tokens that followed it.
The scheduler verifies a draft in one forward pass (see :mod:`dscoder.engine.batch`): drafts only decide how many
tokens a step may produce, never which ones, so a wrong draft costs time, not correctness.
"""

from __future__ import annotations


class PromptLookup:
    """An n-gram index over one growing token list, updated incrementally (a few dict writes per new token)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.sizes = tuple(range(max_ngram, min_ngram - 1, -1))
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> start of what followed its latest occurrence
        self.done = 0  # continuation starts indexed so far: 1 .. done

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching last n-gram."""
        L = len(tokens)
        for c in range(self.done + 1, L):  # index n-grams ending before each new continuation start c <= L - 1
            for n in self.sizes:
                if c >= n:
                    self.index[tuple(tokens[c - n:c])] = c
        self.done = max(self.done, L - 1)
        if k <= 0:
            return []
        for n in self.sizes:
            if L >= n:
                c = self.index.get(tuple(tokens[L - n:]))
                if c is not None:
                    return tokens[c:c + k]
        return []
