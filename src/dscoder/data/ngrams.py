"""Code-token n-grams, vectorised: MinHash signatures for near-dedup and n-gram sets for decontamination.

Code is split into identifier/number tokens (``[A-Za-z_0-9]+``, as BigCode's near-dedup does); each token is
hashed once with xxh32 and n-gram hashes are combined in numpy, so per-file cost is a few array operations.
Shingles are fed to datasketch's MinHash (256 permutations, seed 42 by default), so signatures plug into
``datasketch.MinHashLSH`` with the (bands, rows) it derives for the threshold (BigCode: 0.7 → 25 × 10).
"""

from __future__ import annotations

import re

import numpy as np
import xxhash
from datasketch import MinHash

_TOKEN = re.compile(r"[A-Za-z_0-9]+")
_MAX_HASH = np.uint64((1 << 32) - 1)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for combining token hashes


def code_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def token_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh32_intdigest(t.encode()) for t in tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every run of ``n`` consecutive token hashes (empty when fewer than n tokens)."""
    if len(hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        out = hashes[: len(hashes) - n + 1].copy()
        for j in range(1, n):
            out = out * _MULT + hashes[j: len(hashes) - n + 1 + j]
    return out


def _identity(x):
    return x


class MinHasher:
    """datasketch MinHash (its default ``affine32`` scheme) over 5-gram shingles of code tokens."""

    def __init__(self, num_perm: int = 256, ngram: int = 5, seed: int = 42):
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed

    def signature(self, text: str) -> np.ndarray | None:
        """``[num_perm]`` hash values, or None for files with fewer than ``ngram`` tokens (not deduped)."""
        return self.signature_of_hashes(token_hashes(code_tokens(text)))

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray | None:
        shingles = ngram_hashes(hashes, self.ngram)
        if len(shingles) == 0:
            return None
        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity)
        m.update_batch(np.unique((shingles & _MAX_HASH).astype(np.uint32)))
        return m.hashvalues

    def to_datasketch(self, hashvalues: np.ndarray) -> MinHash:
        return MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues, scheme="affine32")
