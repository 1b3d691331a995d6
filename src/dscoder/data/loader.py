"""PackedLoader: the pre-training loader. Documents from a mixture of builds → FIM → packed, resumable batches.

The stream a rank sees, and why it is reproducible:

- **Mixture.** Weights are shares of *tokens* (normalised), as the paper's 60% code / 10% math / 30% text are:
  the next document comes from the source furthest behind its share, the one with the least
  ``tokens taken / weight`` (ties: the first listed). So after T tokens each source has had ``weight_s * T`` tokens to
  within one of its documents, whatever its documents' lengths, and the choice is a pure function of the counts,
  which the state holds (a few integers). Which document of the source comes next is random (the permutations
  below). :attr:`PackedLoader.label_tokens` counts the tokens each source has given as labels (what training
  learned from): :meth:`PackedLoader.token_shares` is what a run logs.
- **Order.** Each source's documents are visited in a random permutation per epoch, a pure function of
  ``(seed, source, epoch)`` and therefore the same on every rank; rank r takes permutation positions
  ``r, r + world_size, ...``, so ranks read disjoint documents of an epoch and together read all of it. A source that
  runs out starts its next epoch with a new permutation. Each rank computes its own slice: nothing depends on what
  other ranks did. (Ranks draw their mixtures independently, so they may be in different epochs of a source.)
- **FIM.** A document's ids are decoded, FIM-transformed at character level with probability ``fim_rate`` and
  re-tokenised, and EOS is appended (``dscoder.data.fim.document_tokens``), with a generator seeded by
  ``(seed, source, epoch, document)``: the same document gets the same split in an epoch whatever the rank count,
  and a fresh one next epoch. With ``fim_rate == 0`` the stored ids plus EOS are used directly (no decode).
- **Packing.** Documents are concatenated into one token stream and cut into rows of ``seq_len + 1`` tokens that
  start every ``seq_len`` tokens (Megatron's windows): row r is ``stream[r*L : r*L + L + 1]``, its inputs
  ``row[:-1]`` and labels ``row[1:]``. So the last token of a row is repeated as the first input of the next row;
  every stream token after the first is a label exactly once, nothing is padded and nothing is dropped, and rows
  cross document boundaries (EOS marks them).

- **Row shuffling** (``shuffle_rows = R``, off by default). Consecutive windows of one stream come from the same
  document, so a batch of a few rows is mostly one file and a small model drifts toward whatever file it read last.
  With ``R`` set, the loader packs ``R`` rows (rounded up to whole batches) at once and serves them in a random
  order, a pure function of ``(seed, rank, block number)``, as Megatron shuffles its sample indices: a batch then
  holds windows of many documents. The rows, FIM choices and label counts are the unshuffled stream's; only their
  order within a block changes. The saved state is the stream position at the block's start plus the position in
  the block, and restoring repacks the block.

``state_dict()`` is a few integers: per-source epoch and position, the mixture counter, the partly consumed
document (which source, epoch and document, and how far into it), and rows produced. The carry-over tokens are not
stored but regenerated from that reference on ``load_state_dict``, which is exact because every random choice above
is a function of the seed and counters. A restored loader yields exactly the batches the original would have.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dscoder.data.fim import document_tokens
from dscoder.data.shards import TOKEN_DTYPE, TokenDataset
from dscoder.errors import DscoderError

if TYPE_CHECKING:
    from dscoder.tokenizer import Tokenizer

# Tags keep the seeded streams apart: SeedSequence([seed, tag, ...]).
_PERMUTATION, _FIM, _SHUFFLE = 0, 2, 3  # (1 was a random mixture's)
_STATE_VERSION = 2  # 1: a random per-document mixture (read for a single source, where it is the same stream)


class _Source:
    """One build: its documents and this rank's cursor (epoch, position within the rank's slice of the epoch)."""

    def __init__(self, index: int, path: Path, dataset: TokenDataset, seed: int, rank: int, world_size: int):
        self.index, self.path, self.dataset = index, path, dataset
        self._seed, self._rank, self._world_size = seed, rank, world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The document indices this rank visits in ``epoch``, in visit order."""
        rng = np.random.default_rng([self._seed, _PERMUTATION, self.index, epoch])
        return rng.permutation(len(self.dataset))[self._rank:: self._world_size]

    def take(self) -> tuple[int, int]:
        """Advance the cursor by one document; returns ``(epoch, document index)``."""
        if self._order_epoch != self.epoch:
            self._order = self.order(self.epoch)
            self._order_epoch = self.epoch
        if self.position == len(self._order):
            self.epoch += 1
            self.position = 0
            return self.take()
        doc = int(self._order[self.position])
        self.position += 1
        return self.epoch, doc


class PackedLoader:
    """Infinite iterator of ``{"input_ids": LongTensor [B, L], "labels": LongTensor [B, L]}`` for one data rank.

    Args:
        sources: a build directory, or a list of ``(build_directory, weight)`` for a mixture (weights > 0, normalised;
            the paper's mixture is 60% code, 10% math, 30% natural language, in tokens). A third element ``min_tokens`` keeps
            only that build's documents of at least that many tokens: listing a build twice, once whole and once
            with ``min_tokens``, upsamples its long documents (long-context extension).
        tokenizer: the ``Tokenizer`` the builds were made with (EOS, and decode/encode for FIM).
        seq_len: L, tokens per row; batch_size: B, rows per batch (per rank).
        rank, world_size: this data-parallel rank and how many there are.
        seed: every random choice (mixture, permutations, FIM) is a function of it and counters.
        fim_rate: probability a document is FIM-transformed; spm_rate: probability a FIM document uses SPM order.
        shuffle_rows: 0 (off), or serve rows in a random order within blocks of this many rows (see the module's
            docstring).
    """

    def __init__(self, sources: str | os.PathLike | Sequence[tuple[str | os.PathLike, float]],
                 tokenizer: Tokenizer, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, fim_rate: float = 0.5, spm_rate: float = 0.0, shuffle_rows: int = 0):
        _check_int("seq_len", seq_len, minimum=1)
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("world_size", world_size, minimum=1)
        _check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise DscoderError(f"PackedLoader: rank must be in [0, world_size={world_size}), got {rank}")
        _check_int("seed", seed, minimum=0)
        _check_rate("fim_rate", fim_rate)
        _check_rate("spm_rate", spm_rate)
        _check_int("shuffle_rows", shuffle_rows, minimum=0)
        if fim_rate > 0 and None in (tokenizer.fim_begin_id, tokenizer.fim_hole_id, tokenizer.fim_end_id):
            raise DscoderError(f"PackedLoader: fim_rate={fim_rate} needs a tokenizer with the FIM tokens; this one "
                               "lacks some (use fim_rate=0)")
        paths, weights, min_tokens = _parse_sources(sources)

        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.fim_rate, self.spm_rate = float(fim_rate), float(spm_rate)
        self.sources: list[_Source] = []
        for i, path in enumerate(paths):
            dataset = _open_build(i, path, world_size, min_tokens[i])
            self.sources.append(_Source(i, path, dataset, seed, rank, world_size))
        total = math.fsum(weights)
        self.weights = [w / total for w in weights]
        self._eos = np.asarray([tokenizer.eos_id], dtype=TOKEN_DTYPE)

        self._docs_drawn = 0  # documents taken so far by this rank
        self.taken_tokens = [0] * len(self.sources)  # tokens of the documents taken from each source (the mixture)
        self.label_tokens = [0] * len(self.sources)  # tokens each source gave as labels of the batches so far
        self._doc = np.zeros(0, dtype=TOKEN_DTYPE)  # the partly consumed document's tokens (after FIM, with EOS)
        self._doc_ref: tuple[int, int, int] | None = None  # its (source, epoch, document index)
        self._doc_pos = 0  # next stream token = self._doc[self._doc_pos]
        self.rows = 0
        # row shuffling: a block is packed rows in serving order; the state saved is the stream's at its start
        self.shuffle_rows = -(-shuffle_rows // batch_size) * batch_size if shuffle_rows else 0
        self._block: np.ndarray | None = None
        self._block_pos = 0
        self._blocks = 0  # blocks packed so far
        self._block_start: dict[str, Any] | None = None

    # -- the stream ---------------------------------------------------------------------------------------------

    def documents(self, source: int, epoch: int) -> np.ndarray:
        """The document indices of ``sources[source]`` that this rank visits in ``epoch``, in visit order."""
        return self.sources[source].order(epoch)

    def _pick_source(self) -> int:
        """The source furthest behind its token share (the first listed on a tie)."""
        if len(self.sources) == 1:
            return 0
        return min(range(len(self.sources)), key=lambda s: (self.taken_tokens[s] / self.weights[s], s))

    def token_shares(self) -> list[float]:
        """Each source's share of the label tokens so far (zeros before the first batch)."""
        total = sum(self.label_tokens)
        return [n / total if total else 0.0 for n in self.label_tokens]

    def _document(self, source: int, epoch: int, index: int) -> np.ndarray:
        """Tokens of one document as they enter the stream: FIM (maybe) and EOS."""
        ids = self.sources[source].dataset[index]
        if self.fim_rate == 0.0:
            out = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
            out[:-1] = ids
            out[-1] = self._eos[0]
            return out
        rng = np.random.default_rng([self.seed, _FIM, source, epoch, index])
        text = self.tokenizer.decode(ids.tolist())
        tokens = document_tokens(text, rng, self.tokenizer, fim_rate=self.fim_rate, spm_rate=self.spm_rate)
        return np.asarray(tokens, dtype=TOKEN_DTYPE)

    def _next_document(self) -> np.ndarray:
        source = self._pick_source()
        self._docs_drawn += 1
        epoch, index = self.sources[source].take()
        self._doc_ref = (source, epoch, index)
        doc = self._document(source, epoch, index)
        self.taken_tokens[source] += len(doc)
        return doc

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def _pack(self, B: int) -> np.ndarray:
        """The stream's next ``B`` rows, as ``B * L + 1`` tokens (row r is ``flat[r*L : r*L + L + 1]``)."""
        L = self.seq_len
        need = B * L + 1  # B windows of L + 1 tokens, each starting where the previous one's last token is
        pieces: list[np.ndarray] = []
        have = 0
        doc, pos = self._doc, self._doc_pos
        labels = self.label_tokens
        first = True  # the batch's first token is an input only (the previous batch's last label, or the start)
        while have + (len(doc) - pos) < need:
            pieces.append(doc[pos:])
            if len(doc) > pos:
                labels[self._doc_ref[0]] += len(doc) - pos - first
                first = False
            have += len(doc) - pos
            doc, pos = self._next_document(), 0
        take = need - have
        pieces.append(doc[pos: pos + take])
        labels[self._doc_ref[0]] += take - first
        # The batch's last token is peeked, not consumed: it is the first input of the next batch.
        self._doc, self._doc_pos = doc, pos + take - 1
        self.rows += B
        return np.concatenate(pieces).astype(np.int64)

    def __next__(self) -> dict[str, torch.Tensor]:
        B, L = self.batch_size, self.seq_len
        if not self.shuffle_rows:
            flat = self._pack(B)
            return {
                "input_ids": torch.from_numpy(flat[:-1].reshape(B, L)),
                "labels": torch.from_numpy(flat[1:].reshape(B, L).copy()),  # own memory: callers mask labels in place
            }
        if self._block is None or self._block_pos >= len(self._block):
            self._block_start = self.stream_state()
            self._next_block()
        rows = self._block[self._block_pos: self._block_pos + B]
        self._block_pos += B
        return {"input_ids": torch.from_numpy(rows[:, :-1].copy()), "labels": torch.from_numpy(rows[:, 1:].copy())}

    def _next_block(self) -> None:
        R, L = self.shuffle_rows, self.seq_len
        flat = self._pack(R)
        rows = np.lib.stride_tricks.sliding_window_view(flat, L + 1)[::L]  # [R, L + 1]
        order = np.random.default_rng([self.seed, _SHUFFLE, self.rank, self._blocks]).permutation(R)
        self._block, self._block_pos = rows[order], 0
        self._blocks += 1

    # -- resume -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable dict from which ``load_state_dict`` restores the exact stream position."""
        if self._block is None:
            return self.stream_state()
        return {**self._block_start, "block": {"rows": self.shuffle_rows, "number": self._blocks - 1,
                                               "position": self._block_pos}}

    def stream_state(self) -> dict[str, Any]:
        """The state after every row packed so far, served or not (``state_dict`` without shuffling): where a loader
        with another row length (the next long-context stage) continues; the rest of a shuffled block is skipped."""
        current = None
        if self._doc_ref is not None:
            source, epoch, index = self._doc_ref
            current = {"source": source, "epoch": epoch, "document": index, "offset": self._doc_pos}
        return {
            "version": _STATE_VERSION,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "fim_rate": self.fim_rate, "spm_rate": self.spm_rate,
            "sources": [{"documents": len(s.dataset), "epoch": s.epoch, "position": s.position}
                        for s in self.sources],
            "documents_drawn": self._docs_drawn,
            "taken_tokens": list(self.taken_tokens), "label_tokens": list(self.label_tokens),
            "current": current,
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict`` (of a loader with the same seed, ranks, FIM rates, sources).

        ``seq_len``, ``batch_size`` and the mixture weights may differ: the token stream continues where it was.
        """
        try:
            if state["version"] not in (1, _STATE_VERSION):
                raise DscoderError(f"loader state: version {state['version']}, expected {_STATE_VERSION}")
            for key in ("seed", "rank", "world_size", "fim_rate", "spm_rate"):
                if state[key] != getattr(self, key):
                    raise DscoderError(f"loader state: saved with {key}={state[key]}, "
                                       f"this loader has {key}={getattr(self, key)}")
            saved = state["sources"]
            if len(saved) != len(self.sources):
                raise DscoderError(f"loader state: saved with {len(saved)} sources, this loader has "
                                   f"{len(self.sources)}")
            for s, entry in zip(self.sources, saved):
                if entry["documents"] != len(s.dataset):
                    raise DscoderError(f"loader state: sources[{s.index}] had {entry['documents']} documents, "
                                       f"{s.path} now holds {len(s.dataset)}")
            current = state["current"]
            if current is not None:
                current = (current["source"], current["epoch"], current["document"], current["offset"])
            docs_drawn, rows = state["documents_drawn"], state["rows"]
            cursors = [(entry["epoch"], entry["position"]) for entry in saved]
            if state["version"] == 1 and len(saved) > 1:
                raise DscoderError("loader state: saved by an older dscoder whose mixture drew documents at random; "
                                   "a mixture now follows token shares: restart the run (or resume it with that "
                                   "version)")
            block = state.get("block")
            if block is not None:
                block = (int(block["rows"]), int(block["number"]), int(block["position"]))
                if block[0] != self.shuffle_rows:
                    raise DscoderError(f"loader state: saved shuffling blocks of {block[0]} rows, this loader "
                                       f"shuffles {self.shuffle_rows or 'none'} (set data.shuffle_rows as the run did)")
            zeros = [0] * len(saved)
            taken, labels = list(state.get("taken_tokens", zeros)), list(state.get("label_tokens", zeros))
            if len(taken) != len(saved) or len(labels) != len(saved):
                raise DscoderError("loader state: malformed, taken_tokens/label_tokens do not match the sources")
        except (KeyError, TypeError, ValueError) as e:
            raise DscoderError(f"loader state: malformed, missing or wrong-typed entry {e}") from None

        doc, doc_ref, doc_pos = np.zeros(0, dtype=TOKEN_DTYPE), None, 0
        if current is not None:  # regenerate the carry-over: the rest of the partly consumed document
            source, epoch, index, doc_pos = current
            doc, doc_ref = self._document(source, epoch, index), (source, epoch, index)
            if not 0 <= doc_pos < len(doc):
                raise DscoderError(f"loader state: offset {doc_pos} is outside its document ({len(doc)} tokens); "
                                   "was it saved with another tokenizer?")
        for s, (epoch, position) in zip(self.sources, cursors):
            s.epoch, s.position = epoch, position
        self._docs_drawn, self.rows = docs_drawn, rows
        self.taken_tokens, self.label_tokens = taken, labels
        self._doc, self._doc_ref, self._doc_pos = doc, doc_ref, doc_pos
        self._block, self._block_pos, self._blocks, self._block_start = None, 0, 0, None
        if block is not None:  # repack the block the saved position is in
            self._block_start = self.stream_state()
            self._blocks = block[1]
            self._next_block()
            self._block_pos = block[2]


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DscoderError(f"PackedLoader: {name} must be {what}, got {value!r}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DscoderError(f"PackedLoader: {name} must be a probability in [0, 1], got {value!r}")


def _parse_sources(sources: Any) -> tuple[list[Path], list[float], list[int]]:
    if isinstance(sources, (str, os.PathLike)):
        return [Path(sources)], [1.0], [0]
    if not isinstance(sources, Sequence) or not sources:
        raise DscoderError("PackedLoader: sources must be a build directory or a non-empty list of "
                           f"(build_directory, weight), got {sources!r}")
    paths, weights, min_tokens = [], [], []
    for i, item in enumerate(sources):
        if (not isinstance(item, (tuple, list)) or len(item) not in (2, 3)
                or not isinstance(item[0], (str, os.PathLike))):
            raise DscoderError(f"PackedLoader: sources[{i}] must be a (build_directory, weight[, min_tokens]) "
                               f"tuple, got {item!r}")
        path, weight = item[0], item[1]
        minimum = item[2] if len(item) == 3 else 0
        if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
            raise DscoderError(f"PackedLoader: sources[{i}] min_tokens must be an integer >= 0, got {minimum!r}")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                or weight <= 0):
            raise DscoderError(f"PackedLoader: sources[{i}] weight must be a finite number > 0, got {weight!r}")
        paths.append(Path(path))
        weights.append(float(weight))
        min_tokens.append(minimum)
    return paths, weights, min_tokens


def _open_build(index: int, path: Path, world_size: int, min_tokens: int = 0) -> TokenDataset:
    if not path.is_dir():
        raise DscoderError(f"PackedLoader: sources[{index}]: {path} is not a directory (expected a build)")
    dataset = TokenDataset(path, min_tokens=min_tokens)
    if len(dataset) == 0:
        raise DscoderError(f"PackedLoader: sources[{index}]: {path} holds no documents"
                           + (f" of {min_tokens} tokens or more" if min_tokens else ""))
    if len(dataset) < world_size:
        raise DscoderError(f"PackedLoader: sources[{index}]: {path} holds {len(dataset)} documents, fewer than "
                           f"world_size={world_size} (every rank needs at least one per epoch)")
    return dataset
