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
from datasketch.minhash import _fmix  # the finalizer datasketch's affine32 scheme applies first

_TOKEN = re.compile(r"[A-Za-z_0-9]+")
_MAX_HASH = np.uint64((1 << 32) - 1)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for combining token hashes


def code_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def token_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter(map(xxhash.xxh32_intdigest, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))


_last: list = [None, None]  # the last text given to hashed_tokens (kept alive, so `is` identifies it) and its result


def hashed_tokens(text: str) -> tuple[list[str], np.ndarray]:
    """``(code_tokens(text), token_hashes(...))``, remembered for the last text: decontamination and the MinHash
    signature of one document tokenize it once."""
    if _last[0] is not text:
        tokens = code_tokens(text)
        _last[:] = text, (tokens, token_hashes(tokens))
    return _last[1]


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
    """datasketch MinHash (its default ``affine32`` scheme) over 5-gram shingles of code tokens.

    The signature is datasketch's ``update_batch`` arithmetic done here with the permutations drawn once (datasketch
    draws them for every MinHash and hashes its input in a Python loop): the MurmurHash3 finalizer of each shingle,
    ``a * h + b`` modulo 2^32 per permutation, the minimum over shingles (tests check it against datasketch).
    """

    def __init__(self, num_perm: int = 256, ngram: int = 5, seed: int = 42):
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        reference = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        assert reference.scheme == "affine32"
        self._permutations = reference.permutations
        self._a, self._b = (np.asarray(p, dtype=np.uint32) for p in reference.permutations)
        self._empty = reference.hashvalues.copy()

    def signature(self, text: str) -> np.ndarray | None:
        """``[num_perm]`` hash values, or None for files with fewer than ``ngram`` tokens (not deduped)."""
        return self.signature_of_hashes(hashed_tokens(text)[1])

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray | None:
        shingles = ngram_hashes(hashes, self.ngram)
        if len(shingles) == 0:
            return None
        hv = _fmix(np.unique((shingles & _MAX_HASH).astype(np.uint32)), 32)[:, None]
        permuted = np.multiply(hv, self._a)  # [shingles, num_perm], wrapping modulo 2^32
        permuted += self._b
        return np.minimum(self._empty, permuted.min(axis=0))

    def signature_reference(self, text: str) -> np.ndarray | None:
        """:meth:`signature` through datasketch's own ``MinHash.update_batch`` (the plain path, for tests)."""
        shingles = ngram_hashes(token_hashes(code_tokens(text)), self.ngram)
        if len(shingles) == 0:
            return None
        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity)
        m.update_batch(np.unique((shingles & _MAX_HASH).astype(np.uint32)))
        return m.hashvalues

    def to_datasketch(self, hashvalues: np.ndarray) -> MinHash:
        # the permutations given, or datasketch draws them again for every MinHash
        return MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues, scheme="affine32",
                       permutations=self._permutations)
