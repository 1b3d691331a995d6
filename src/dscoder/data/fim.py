"""Fill-In-the-Middle, one document at a time, before packing (DeepSeek-Coder-V2 §3.1: PSM mode, FIM rate 0.5).

A document is cut at two character positions drawn uniformly from [0, len(text)] into prefix, middle and suffix,
each piece is encoded on its own, and the pieces are laid out with the sentinels (B = fim_begin, H = fim_hole,
E = fim_end; DeepSeek calls the sentinel before the suffix "hole") by :func:`dscoder.tokenizer.fim_layout`, the
function that also lays out the inference prompt (``Tokenizer.fim_ids`` / ``fim_prompt``), so the two cannot drift::

    PSM: B enc(prefix) H enc(suffix) E enc(middle)                 (the paper; the inference prompt stops at E)
    SPM: B H enc(suffix) E enc(prefix) enc(middle)

SPM is the variant of Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle", App. D)
that keeps the PSM sentinel order: the suffix comes first and the prefix runs straight into the middle, so the
middle is an ordinary continuation of the prefix. With an empty prefix both layouts are the same sequence.
DeepSeek-Coder-V2 trains PSM only, so ``spm_rate`` defaults to 0.

Pieces are encoded without special-token parsing, so a document that contains a sentinel's spelling never yields a
sentinel id and :func:`undo_fim` can always find the layout again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dscoder.errors import ConfigError
from dscoder.tokenizer import FIM_MODES, fim_layout


class FimTokenizer(Protocol):
    """What FIM needs from a tokenizer (``dscoder.tokenizer.Tokenizer`` is one)."""

    eos_id: int
    fim_begin_id: int | None
    fim_hole_id: int | None
    fim_end_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut ``text`` at two positions drawn uniformly from [0, len(text)] (both ends included), sorted:
    returns (prefix, middle, suffix) with ``prefix + middle + suffix == text``. Cuts fall between characters
    (code points), never inside a UTF-8 byte sequence."""
    lo, hi = sorted(int(c) for c in rng.integers(0, len(text) + 1, size=2))
    return text[:lo], text[lo:hi], text[hi:]


def fim_tokens(text: str, rng: np.random.Generator, tok: FimTokenizer, mode: str = "psm") -> list[int]:
    """The FIM token ids of one document in ``mode`` "psm" or "spm" (layouts in the module docstring); no eos."""
    if mode not in FIM_MODES:
        raise ConfigError(f"FIM mode must be one of {', '.join(FIM_MODES)}, got {mode!r}")
    sentinels = _sentinels(tok)
    prefix, middle, suffix = fim_split(text, rng)
    return fim_layout(tok.encode(prefix), tok.encode(suffix), tok.encode(middle), sentinels, mode)


def document_tokens(text: str, rng: np.random.Generator, tok: FimTokenizer, fim_rate: float = 0.5,
                    spm_rate: float = 0.0) -> list[int]:
    """The training ids of one document, eos last: FIM with probability ``fim_rate`` (SPM for a fraction
    ``spm_rate`` of those, else PSM), plain ``enc(text)`` otherwise.

    Draws from ``rng`` in a fixed order (FIM or not, SPM or not, the two cuts), so the same generator state always
    gives the same ids.
    """
    _check_rate("fim_rate", fim_rate)
    _check_rate("spm_rate", spm_rate)
    if rng.random() < fim_rate:
        mode = "spm" if rng.random() < spm_rate else "psm"
        ids = fim_tokens(text, rng, tok, mode)
    else:
        ids = list(tok.encode(text))
    ids.append(tok.eos_id)
    return ids


def undo_fim(ids: Sequence[int], tok: FimTokenizer) -> str:
    """The original document text of ``document_tokens`` (or ``fim_tokens``) output: PSM, SPM or plain, with or
    without the trailing eos."""
    ids = list(ids)
    if ids and ids[-1] == tok.eos_id:
        ids.pop()
    begin, hole, end = _sentinels(tok)
    if not ids or ids[0] != begin:
        return tok.decode(ids)
    try:
        h = ids.index(hole, 1)
        e = ids.index(end, h + 1)
    except ValueError:
        raise ValueError("not a FIM sequence: fim_begin must be followed by fim_hole and then fim_end") from None
    first, suffix, tail = ids[1:h], ids[h + 1:e], ids[e + 1:]
    # Each piece was encoded on its own from whole characters, so pieces decode independently.
    if not first:  # SPM, or PSM with an empty prefix (the same sequence): tail is enc(prefix) + enc(middle)
        return tok.decode(tail) + tok.decode(suffix)
    return tok.decode(first) + tok.decode(tail) + tok.decode(suffix)


def _sentinels(tok: FimTokenizer) -> tuple[int, int, int]:
    ids = (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id)
    if None in ids:
        raise ConfigError("FIM needs a tokenizer with the fim_begin, fim_hole and fim_end tokens; this one lacks some")
    return ids  # type: ignore[return-value]


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
