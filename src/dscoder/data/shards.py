"""Token shards: the documents of a build as memory-mapped token arrays.

A build directory holds ``tokens/NAME.bin`` (uint32 little-endian token ids, documents back to back, no
separators) and ``tokens/NAME.idx.npy`` (int64 offsets, ``n_docs + 1`` of them: document i is
``bin[idx[i]:idx[i+1]]``). Shards are written under temporary names and renamed on close, so a shard that exists
is complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dscoder.errors import DscoderError
from dscoder.io import atomic_write

TOKEN_DTYPE = np.dtype("<u4")


class ShardWriter:
    """Writes one shard through :func:`dscoder.io.atomic_write`: the index appears first, then the ``.bin``, so a
    ``.bin`` that exists is complete and has its index. Used as a context manager, an error discards the shard."""

    def __init__(self, directory: str | Path, name: str):
        self.directory = Path(directory)
        self.name = name
        self._files = contextlib.ExitStack()
        self._file = self._files.enter_context(atomic_write(self.directory / f"{name}.bin", "wb"))
        self._offsets = [0]
        self._closed = False

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=TOKEN_DTYPE)
        self._file.write(arr.tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    def close(self) -> tuple[int, int]:
        """Finish the shard; returns ``(n_docs, n_tokens)``."""
        if not self._closed:
            with atomic_write(self.directory / f"{self.name}.idx.npy", "wb") as f:
                np.save(f, np.asarray(self._offsets, dtype=np.int64))
            self._closed = True
            self._files.close()
        return self.n_docs, self.n_tokens

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None and not self._closed:
            self._closed = True
            self._files.__exit__(kind, error, tb)  # the partial .bin is removed, nothing is renamed
        else:
            self.close()


class TokenDataset:
    """All token shards under ``directory`` (a build dir or its ``tokens/``), in name order, as one document list;
    with ``min_tokens``, only the documents at least that long (to upsample long documents in a mixture)."""

    def __init__(self, directory: str | Path, min_tokens: int = 0):
        directory = Path(directory)
        token_dir = directory / "tokens" if (directory / "tokens").is_dir() else directory
        bins = sorted(token_dir.glob("*.bin"))
        if not bins:
            raise DscoderError(f"{directory}: no token shards (expected tokens/*.bin from `dscoder data build`)")
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for b in bins:
            idx = b.with_name(b.name[: -len(".bin")] + ".idx.npy")
            if not idx.exists():
                raise DscoderError(f"{b}: its index {idx.name} is missing")
            offsets = np.load(idx)
            tokens = (np.memmap(b, dtype=TOKEN_DTYPE, mode="r") if b.stat().st_size
                      else np.zeros(0, dtype=TOKEN_DTYPE))
            if offsets[-1] != len(tokens):
                raise DscoderError(f"{b}: holds {len(tokens)} tokens but its index says {offsets[-1]}")
            self._tokens.append(tokens)
            self._offsets.append(offsets)
        counts = [len(o) - 1 for o in self._offsets]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._index = None
        if min_tokens > 0:
            lengths = np.concatenate([np.diff(o) for o in self._offsets])
            self._index = np.flatnonzero(lengths >= min_tokens)

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._index is None else len(self._index)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self._tokens))

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._index is not None:
            i = int(self._index[i])
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[shard])
        offsets = self._offsets[shard]
        return self._tokens[shard][offsets[j]: offsets[j + 1]]
