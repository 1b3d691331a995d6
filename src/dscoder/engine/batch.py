"""Continuous batching over one preallocated latent cache.

Shape legend: B slots (rows of the cache), S cache positions, V vocabulary, N prompt tokens.

The cache ``[layers, B, S, C + R]`` has a shared write cursor: every decode step writes all rows at position
``cursor`` (the model takes one ``start_pos``), and each row keeps its own RoPE positions (``pos``) and a mask
row ``mask[b, :]`` marking which cache entries belong to its sequence. Cached keys carry their rotation, so an
entry can sit at any cache index: a joining request is prefilled alone (expanded path, left-padded with the
others that join with it) into a scratch cache and copied into its row just before the cursor. When the cursor
reaches the end, rows are compacted (their entries gathered to the right end) and decoding goes on.

Decode runs ``sync_every`` steps between host syncs (one step when a request streams); requests join and leave
at those syncs. A row that finished inside a block decodes garbage until the sync, which is then ignored.
With compiled decode steps, the decoded slot prefix is rounded up to a bucket (1, 2, 4, ..., max_batch): each
bucket gets a graph specialized to its batch size, and the free rows in it decode tokens nobody reads.

A prompt whose first blocks are in the :class:`PrefixCache`, or one longer than ``prefill_chunk``, is instead the
prefill job: it owns a slot and a scratch cache, gets one chunk per step (the running rows decode in between) and
joins its row like any prefilled prompt after its last chunk.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dscoder.engine.native import DecodePlan
from dscoder.engine.sampling import Needs, RowParams, SamplingParams, sample
from dscoder.engine.speculative import PromptLookup
from dscoder.model import MLACache

_ids = itertools.count()
SPEC_PAUSE = 8  # plain steps after a wrong one-token draft before drafting again


@dataclass
class Completion:
    """A finished request: ``finish_reason`` is ``"stop"`` (eos, stop token or stop string), ``"length"``
    (max_tokens or the context) or ``"cancelled"``. ``token_ids`` are all generated ids (a final eos or stop token
    included); ``text`` is their decoding without special tokens, cut before a stop string.
    ``logprobs[i]`` is token i's log-probability and ``top_logprobs[i]`` maps token ids to log-probabilities."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not prefilled)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sequence:
    """One request's state. ``on_update(seq, delta_text, new_token_ids, finished)`` runs on the engine thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_len: int, eos_id: int | None,
                 tokenizer=None, on_update: Callable | None = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.on_update = on_update
        self.max_new = min(params.max_tokens, max_len - len(self.prompt_ids))
        self.stop_ids = set(params.stop_token_ids)
        if eos_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_id)
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.text = ""
        self._emitted = 0  # characters already handed to on_update
        self._pending_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.cached_prefix: tuple[int, torch.Tensor | None] | None = None  # the scheduler's prefix-cache lookup
        # Prompt tokens whose cache entries came from the prefix cache instead of a prefill (llama.cpp's
        # tokens_cached): a multiple of the block size, at most len(prompt_ids) - 1; set when the request is admitted.
        self.cached_tokens = 0
        self.spec_steps = 0  # speculative verify steps this request took
        self.spec_drafted = 0  # draft tokens those steps checked
        self.spec_accepted = 0  # draft tokens they accepted (each step also yields one token of its own)
        self.lookup: PromptLookup | None = None  # the drafter's n-gram index, made on the first speculative step
        self.draft_len = 0  # tokens the next draft may have (0: the scheduler's maximum; adapted after each step)
        self.spec_pause = 0  # plain steps to take before drafting again (after a one-token draft was wrong)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> None:
        """Append one sampled token and decide whether the sequence ends."""
        self.token_ids.append(token)
        self._pending_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top or {})
        if token in self.stop_ids:
            self.finish("stop")
            return
        if self._check_stop_strings():
            return
        if len(self.token_ids) >= self.max_new:
            self.finish("length")

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        ids = self.token_ids[:-1] if self.token_ids and self.token_ids[-1] in self.stop_ids else self.token_ids
        return self.tokenizer.decode(ids, skip_special=True)

    def _check_stop_strings(self) -> bool:
        if not self.params.stop:
            return False
        text = self._decode()
        found = [i for i in (text.find(s, max(0, self._emitted - len(s))) for s in self.params.stop) if i >= 0]
        if found:
            self.finish("stop", text=text[: min(found)])
            return True
        self.text = text
        return False

    def stream_delta(self) -> tuple[str, list[int]]:
        """Text that can be shown now: hold back a partial UTF-8 character and a possible stop-string start."""
        text = self.text
        if not self.finished:
            text = text.rstrip("\ufffd")
            for s in self.params.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        delta = text[self._emitted:] if len(text) > self._emitted else ""
        self._emitted = max(self._emitted, len(text))
        ids, self._pending_ids = self._pending_ids, []
        return delta, ids

    def notify(self) -> None:
        if self.on_update is not None:
            if not self.finished and not self.params.stop:
                self.text = self._decode()
            delta, ids = self.stream_delta()
            if delta or ids or self.finished:
                self.on_update(self, delta, ids, self.finished)

    def finish(self, reason: str, error: BaseException | None = None, text: str | None = None) -> None:
        if self.finished:
            return
        self.text = text if text is not None else self._decode()
        self.finish_reason = reason
        self.error = error

    def result(self) -> Completion:
        return Completion(self.text, list(self.token_ids), len(self.prompt_ids), self.finish_reason or "length",
                          self.logprobs, self.top_logprobs, self.cached_tokens)


class PrefixCache:
    """Cache entries of prompt prefixes, kept in blocks of ``block`` tokens, least recently used dropped first.

    Block i of a prompt is keyed by its tokens and every token before it (a chained hash), so a hit means the same
    tokens at the same positions, hence the same latents and rotated keys. A stored prompt's last partial block is
    kept too (its tail), and each key remembers the latest block or tail stored after it, so reuse is exact to the
    token: a prompt takes every full block it shares, then the common start of the block or tail that followed
    them (a prompt extended, repeated, or edited a few tokens before its end). The entry at position j depends only
    on tokens 0..j, so any common prefix of a stored block is valid for the new prompt. A joining request whose
    prompt starts with cached entries copies them and prefills only the rest (as the scheduler's prefill job).
    """

    def __init__(self, max_bytes: int, block: int = 32):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: dict[int, torch.Tensor] = {}  # key -> [layers, block, C + R]
        self.tails: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}  # parent key -> (tokens, [layers, n, C + R])
        self.children: dict[int, tuple[int, tuple[int, ...]]] = {}  # parent key -> (key, tokens) of the latest block
        self._parent: dict[int, int] = {}  # block key -> the key before it
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()  # ("b", key) or ("t", parent) -> bytes
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache (for stats and tests)

    def lookup(self, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """``(m, entries [layers, m, C + R])`` for the longest cached prefix of ``ids`` leaving >= 1 token to
        prefill."""
        B, limit = self.block, len(ids) - 1
        found, parent, m = [], 0, 0
        while m + B <= limit:
            key = hash((parent, tuple(ids[m:m + B])))
            block = self.blocks.get(key)
            if block is None:
                break
            self._lru.move_to_end(("b", key))
            found.append(block)
            parent, m = key, m + B
        rest, best, best_n, best_lru = ids[m:limit], None, 0, None
        child = self.children.get(parent)
        candidates = [(("b", child[0]), child[1], self.blocks.get(child[0]))] if child else []
        if parent in self.tails:
            candidates.append((("t", parent), *self.tails[parent]))
        for lru, tokens, entries in candidates:
            n = next((i for i, (a, b) in enumerate(zip(tokens, rest)) if a != b), min(len(tokens), len(rest)))
            if entries is not None and n > best_n:
                best, best_n, best_lru = entries, n, lru
        if best is not None:
            self._lru.move_to_end(best_lru)
            found.append(best[:, :best_n])
            m += best_n
        if not m:
            return 0, None
        self.hit_tokens += m
        return m, torch.cat(found, dim=1)

    def store(self, ids: list[int], entries: torch.Tensor) -> None:
        """Keep the blocks and the tail of a prompt whose entries ``[layers, len(ids), C + R]`` were just computed."""
        B, parent = self.block, 0
        full = len(ids) // B
        for i in range(full):
            tokens = tuple(ids[i * B:(i + 1) * B])
            key = hash((parent, tokens))
            self.children[parent] = (key, tokens)
            if key in self.blocks:
                self._lru.move_to_end(("b", key))
            elif not self._add(("b", key), entries[:, i * B:(i + 1) * B]):
                return
            else:
                self._parent[key] = parent
            parent = key
        if full * B < len(ids):
            if parent in self.tails:
                self._drop(("t", parent))
            self._add(("t", parent), entries[:, full * B:], tuple(ids[full * B:]))

    def _add(self, lru: tuple[str, int], entries: torch.Tensor, tokens: tuple[int, ...] = ()) -> bool:
        size = entries.numel() * entries.element_size()
        if size > self.max_bytes:
            return False
        while self.nbytes + size > self.max_bytes:
            self._drop(next(iter(self._lru)))
        kind, key = lru
        if kind == "b":
            self.blocks[key] = entries.clone()
        else:
            self.tails[key] = (tokens, entries.clone())
        self._lru[lru] = size
        self.nbytes += size
        return True

    def _drop(self, lru: tuple[str, int]) -> None:
        self.nbytes -= self._lru.pop(lru)
        kind, key = lru
        if kind == "t":
            del self.tails[key]
            return
        del self.blocks[key]
        parent = self._parent.pop(key)
        if self.children.get(parent, (None,))[0] == key:
            del self.children[parent]


@dataclass
class _Prefill:
    """The request being prefilled over several steps: its slot, its own scratch cache, tokens done so far and,
    once all are, the last token's logits."""

    seq: Sequence
    slot: int
    scratch: MLACache
    done: int
    logits: torch.Tensor | None = None


class Scheduler:
    """Slots over one :class:`MLACache`; :meth:`step` admits waiting requests and decodes a block of tokens."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 2048, sync_every: int = 8, pad_id: int = 0,
                 decode_fn: Callable | None = None, prefix_cache_bytes: int = 0, prefill_chunk: int = 0,
                 spec_tokens: int = 0):
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.max_batch, self.max_len, self.sync_every, self.pad_id = max_batch, max_len, sync_every, pad_id
        self.decode_fn = decode_fn if decode_fn is not None else model
        # On CPU a lone row (batch 1) decodes through the native kernels when the weights are bf16 or int8 (see
        # native.py), compiled engines too: at batch 1 they stream the weights faster than the compiled graph.
        self.native = DecodePlan.for_model(model)
        # Compiled decode: batch sizes 1, 2, 4, ... up to max_batch (and max_batch itself).
        self.buckets = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)}) \
            if decode_fn is not None else []
        # Room for a graph per bucket (+1: the first graph, before the cache length is dynamic), granted only
        # around the compiled calls (see _decode_call): no global setting changes.
        self.spec_tokens = spec_tokens  # draft length of prompt-lookup speculation (0: off)
        # + a graph per draft bucket of the verify step (+1: its first, before the cache length is dynamic)
        self.recompile_limit = len(self.buckets) + 2 + (len(self.draft_buckets) + 1 if spec_tokens else 0)
        cfg = model.config
        self.cache = MLACache(cfg, max_batch, max_len, dtype=self.dtype, device=self.device)
        dev = self.device
        self.mask = torch.zeros(max_batch, max_len, dtype=torch.bool, device=dev)  # entry belongs to the row
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=dev)  # RoPE position of the next input
        self.steps = torch.zeros(max_batch, dtype=torch.long, device=dev)  # tokens sampled so far (noise counter)
        self.last = torch.zeros(max_batch, dtype=torch.long, device=dev)  # last sampled token = next input
        self.rows = RowParams.empty(max_batch, dev)
        self.seen = torch.zeros(max_batch, cfg.vocab_size, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(max_batch, cfg.vocab_size, dtype=torch.float32, device=dev)  # generated, per token
        self.slots: list[Sequence | None] = [None] * max_batch
        self.cursor = 0
        self.waiting: deque[Sequence] = deque()
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.prefill_chunk = prefill_chunk  # 0: a prompt is prefilled in one go
        self.job: _Prefill | None = None

    # ----- bookkeeping ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.job is not None or any(s is not None for s in self.slots)

    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def _release(self, slot: int) -> None:
        seq = self.slots[slot]
        self.slots[slot] = None
        if seq is not None:
            seq.notify()
            seq.done.set()

    def _end(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        seq.finish(reason, error)
        seq.notify()
        seq.done.set()

    def fail_all(self, error: BaseException) -> None:
        """End every request with ``error`` (the engine thread's last resort) and reset the cache state."""
        for i in self.active:
            self.slots[i].finish("error", error)
            self._release(i)
        if self.job is not None:
            self._end(self.job.seq, "error", error)
            self.job = None
        while self.waiting:
            self._end(self.waiting.popleft(), "error", error)
        self.mask.zero_()
        self.cursor = 0

    # ----- one scheduling step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        for i in self.active:
            if self.slots[i].cancelled:
                self.slots[i].finish("cancelled")
                self._release(i)
        if self.job is not None and self.job.seq.cancelled:
            self._end(self.job.seq, "cancelled")
            self.job = None
        if not self.active:
            self.cursor = 0
            self.mask.zero_()
        self._admit()
        if self.active:
            self._decode_block()

    def _admit(self) -> None:
        """Start the requests that fit: short prompts without a cached prefix are prefilled together; a prompt with
        cached blocks, or longer than ``prefill_chunk``, becomes the (one) prefill job, advanced a chunk per step."""
        if self.job is not None:
            self._advance_job()
        free = [i for i, s in enumerate(self.slots) if s is None and (self.job is None or i != self.job.slot)]
        take: list[Sequence] = []
        longest = 0
        while self.waiting and len(take) < len(free):
            seq = self.waiting[0]
            warmup = seq.max_new <= 0 and self.prefix_cache is not None  # max_tokens=0: only fill the prefix cache
            if seq.cancelled or (seq.max_new <= 0 and not warmup):
                self.waiting.popleft()
                self._end(seq, "cancelled" if seq.cancelled else "length")
                continue
            if seq.cached_prefix is None:
                seq.cached_prefix = self.prefix_cache.lookup(seq.prompt_ids) if self.prefix_cache else (0, None)
                seq.cached_tokens = seq.cached_prefix[0]
            m, entries = seq.cached_prefix
            if m or warmup or 0 < self.prefill_chunk < len(seq.prompt_ids):
                if self.job is not None:
                    break  # one job at a time, in arrival order
                self.waiting.popleft()
                scratch = MLACache(self.model.config, 1, len(seq.prompt_ids), dtype=self.dtype, device=self.device)
                if m:
                    scratch.kv[:, 0, :m] = entries
                    seq.cached_prefix = (m, None)  # the entries live in the scratch cache now
                self.job = _Prefill(seq, free.pop(0), scratch, m)
                self._advance_job()
                continue
            n = max(longest, len(seq.prompt_ids))
            if max(self.cursor, n) >= self.max_len:
                self._compact()
                if max(self.cursor, n) >= self.max_len:
                    break
            take.append(self.waiting.popleft())
            longest = n
        if take:
            self._prefill(take, free[: len(take)])

    def _advance_job(self) -> None:
        """Prefill the job's next chunk (all the rest without ``prefill_chunk``) over its scratch cache; after the
        last one, move it into its row (once the cache has room)."""
        job = self.job
        N = len(job.seq.prompt_ids)
        if job.done < N:
            end = min(N, job.done + self.prefill_chunk) if self.prefill_chunk else N
            ids = torch.tensor([job.seq.prompt_ids[job.done:end]], device=self.device)
            pos = torch.arange(job.done, end, device=self.device)[None]
            job.logits = self.model(ids, position_ids=pos, cache=job.scratch, start_pos=job.done,
                                    logits_to_keep=1).logits[:, -1]
            job.done = end
            if end < N:
                return
        if job.seq.max_new <= 0:  # a warm-up: its blocks go to the prefix cache, no token is generated
            self.job = None
            self.prefix_cache.store(job.seq.prompt_ids, job.scratch.kv[:, 0])
            self._end(job.seq, "length")
            return
        if max(self.cursor, N) >= self.max_len:
            self._compact()
            if max(self.cursor, N) >= self.max_len:
                return  # no room yet: placed at a later step
        self.job = None
        self._place([job.seq], [job.slot], job.scratch.kv, torch.ones(1, N, dtype=torch.bool, device=self.device),
                    job.logits)

    def _prefill(self, seqs: list[Sequence], slots: list[int]) -> None:
        """Left-padded prefill of the joining requests (expanded path) into a scratch cache, then into their rows."""
        k, N = len(seqs), max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((k, N), self.pad_id, dtype=torch.long)
        am = torch.zeros(k, N, dtype=torch.bool)
        for j, s in enumerate(seqs):
            ids[j, N - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            am[j, N - len(s.prompt_ids):] = True
        ids, am = ids.to(self.device), am.to(self.device)
        pos = (am.long().cumsum(1) - 1).clamp(min=0)
        scratch = MLACache(self.model.config, k, N, dtype=self.dtype, device=self.device)
        logits = self.model(ids, attention_mask=None if bool(am.all()) else am, position_ids=pos, cache=scratch,
                            logits_to_keep=1).logits[:, -1]
        self._place(seqs, slots, scratch.kv, am, logits)

    def _place(self, seqs: list[Sequence], slots: list[int], kv_LKNE: torch.Tensor, am: torch.Tensor,
               logits: torch.Tensor) -> None:
        """Copy prefilled entries (``am`` marks each row's real ones) into the rows just before the write cursor,
        keep their prompt blocks in the prefix cache, and sample each request's first token."""
        N = kv_LKNE.shape[2]
        if self.prefix_cache is not None:
            for j, s in enumerate(seqs):
                self.prefix_cache.store(s.prompt_ids, kv_LKNE[:, j, N - len(s.prompt_ids):])
        end = max(self.cursor, N)
        rows = torch.tensor(slots, device=self.device)
        self.cache.kv[:, rows, end - N:end] = kv_LKNE
        self.mask[rows] = False
        self.mask[rows, end - N:end] = am
        self.cursor = end
        self.pos[rows] = am.sum(1)
        self.steps[rows] = 0
        self.seen[rows] = False
        self.counts[rows] = 0
        needs = Needs.of([s.params for s in seqs])
        for j, (s, slot) in enumerate(zip(seqs, slots)):
            self.slots[slot] = s
            self.rows.set_row(slot, s.params)
            if needs.penalty:
                self.seen[slot, torch.tensor(s.prompt_ids, device=self.device)] = True
        token, lp, top_ids, top_lp = sample(logits, self.rows.index(rows), self.steps[rows], needs, self.seen[rows],
                                            self.counts[rows])
        self._advance(rows, token, needs)
        self._deliver(slots, [token], [lp], [top_ids], [top_lp])

    def _advance(self, rows, token, needs: Needs) -> None:
        self.last[rows] = token
        self.steps[rows] += 1
        if needs.penalty:
            self.seen[rows] = self.seen[rows].scatter(1, token[:, None], True)
        if needs.counts:
            self.counts[rows] = self.counts[rows].scatter_add(
                1, token[:, None], torch.ones(token.shape[0], 1, dtype=self.counts.dtype, device=self.device))

    def _decode_block(self) -> None:
        active = self.active
        seqs = [self.slots[i] for i in active]
        n_steps = 1 if any(s.params.stream for s in seqs) else self.sync_every
        if self._speculates(seqs):
            if self._speculate(active[0], seqs[0]):
                return
            n_steps = 1  # no draft now: one plain step, then look again
        n_steps = min(n_steps, max(s.max_new - len(s.token_ids) for s in seqs))
        if self.cursor + n_steps > self.max_len:
            self._compact()
            n_steps = min(n_steps, self.max_len - self.cursor)
        nb = self._decode_rows(active[-1] + 1)
        view = self.cache.rows(nb)
        live = torch.zeros(nb, dtype=torch.bool, device=self.device)
        live[torch.tensor(active, device=self.device)] = True
        needs = Needs.of([s.params for s in seqs])
        rows = torch.arange(nb, device=self.device)
        row_params = self.rows.index(rows)
        toks, lps, tids, tlps = [], [], [], []
        for _ in range(n_steps):
            self.mask[:nb, self.cursor] = live
            ids, mask, pos = self.last[:nb, None], self.mask[:nb, : self.cursor + 1], self.pos[:nb, None]
            if self.buckets:  # one graph per bucket, specialized to its batch size
                for t, dim in ((ids, 0), (mask, 0), (pos, 0), (view.kv, 1)):
                    torch._dynamo.mark_static(t, dim)
            if self.native is not None and self.native.usable(ids, mask, view, self.cursor):
                logits = self.native.step(ids, mask, pos, view, self.cursor)
            else:
                logits = self._decode_call(ids, attention_mask=mask, position_ids=pos, cache=view,
                                           start_pos=self.cursor).logits[:, -1]
            token, lp, top_ids, top_lp = sample(logits, row_params, self.steps[:nb], needs,
                                                self.seen[:nb] if needs.penalty else None,
                                                self.counts[:nb] if needs.counts else None)
            self._advance(rows, token, needs)
            self.pos[:nb] += 1
            self.cursor += 1
            toks.append(token), lps.append(lp), tids.append(top_ids), tlps.append(top_lp)
        self._deliver(list(range(nb)), toks, lps, tids, tlps)

    # ----- prompt-lookup speculation ----------------------------------------------------------------------------
    def _speculates(self, seqs: list[Sequence]) -> bool:
        """Speculate for a batch of one greedy request without a penalty: there a verify step over
        k + 1 positions costs little more than a plain step (decode is bound by reading weights), whereas with
        more rows the extra positions add real work, and sampled or penalised rows would need their own rules."""
        if not self.spec_tokens or len(seqs) != 1:
            return False
        p = seqs[0].params
        return (p.temperature == 0 and p.repetition_penalty == 1 and p.presence_penalty == 0
                and p.frequency_penalty == 0)

    def _speculate(self, slot: int, seq: Sequence) -> bool:
        """One verify step: draft up to ``spec_tokens`` tokens by prompt lookup, run the last token and the draft
        through the model at once, keep the longest draft prefix equal to the model's own greedy tokens plus the
        model's token after it, and roll the cache back over the rest. False (nothing done) without a draft."""
        left = seq.max_new - len(seq.token_ids)  # tokens still wanted; a step yields up to k + 1
        k = min(seq.draft_len or self.spec_tokens, left - 1)
        if k <= 0:
            return False
        if seq.spec_pause:
            seq.spec_pause -= 1
            return False
        if seq.lookup is None:
            seq.lookup = PromptLookup()
        draft = seq.lookup.draft(seq.prompt_ids + seq.token_ids, k)
        if not draft:
            return False
        drafted = len(draft)
        if self.buckets:  # compiled: a verify graph per draft bucket, the draft padded up to one (a padded token the
            draft = draft + [draft[-1]] * (self._draft_bucket(drafted) - drafted)  # model agrees with is right too)
        T = len(draft) + 1
        if self.cursor + T > self.max_len:
            self._compact()
            if self.cursor + T > self.max_len:
                return False
        c, dev = self.cursor, self.device
        ids = torch.cat([self.last[slot:slot + 1], torch.tensor(draft, device=dev)])[None]  # [1, T]
        offsets = torch.arange(T, device=dev)
        pos = (self.pos[slot] + offsets)[None]
        self.mask[slot, c:c + T] = True
        mask = self.mask[slot:slot + 1, : c + T]
        view = self.cache.rows(1, start=slot)
        if self.buckets:
            for t, dim in ((ids, 0), (ids, 1), (mask, 0), (pos, 0), (pos, 1), (view.kv, 1)):
                torch._dynamo.mark_static(t, dim)
        logits = self._decode_call(ids, attention_mask=mask, position_ids=pos, cache=view, start_pos=c).logits[0]
        rows = self.rows.index(torch.full((T,), slot, device=dev))
        token, lp, top_ids, top_lp = sample(logits, rows, self.steps[slot] + offsets, Needs.of([seq.params]))
        got = token.tolist()  # the host sync of this step
        a = next((j for j in range(T - 1) if got[j] != draft[j]), T - 1)  # draft tokens the model agrees with
        n = a + 1  # tokens this step yields: the accepted draft and the model's own next token
        self.mask[slot, c + n:c + T] = False  # roll back: the rejected positions' entries no longer belong to the row
        self.cursor = c + n
        self.pos[slot] += n
        self.steps[slot] += n
        self.last[slot] = token[a]
        seq.spec_steps += 1
        seq.spec_drafted += T - 1  # padded drafts (compiled) included
        seq.spec_accepted += a
        # Draft length follows acceptance: a verify step over T positions costs more than a plain step (on the
        # benchmark CPU 1.5x for T = 2, 2.7x for T = 9), so after a miss the next draft is as long as what was
        # accepted + 1, and it doubles after a draft taken whole; a wrong one-token draft pauses drafting a while.
        seq.draft_len = min(self.spec_tokens, 2 * drafted if a >= drafted else a + 1)
        if a == 0 and drafted == 1:
            seq.spec_pause = SPEC_PAUSE
        cut = lambda x: [x[j:j + 1] for j in range(n)] if x is not None else [None]  # noqa: E731
        self._deliver([slot], cut(token), cut(lp), cut(top_ids), cut(top_lp))
        return True

    def _draft_bucket(self, n: int) -> int:
        """Compiled verify steps: draft lengths 1, 2, 4, ... up to ``spec_tokens`` (a graph each)."""
        return min(1 << (n - 1).bit_length(), self.spec_tokens)

    @property
    def draft_buckets(self) -> list[int]:
        return sorted({self._draft_bucket(n) for n in range(1, self.spec_tokens + 1)})

    @torch.inference_mode()
    def warm_verify(self) -> None:
        """Compiled engines: run the verify step's shapes once on an idle cache, so their graphs compile now
        (warm-up) rather than on the first requests that speculate."""
        if not (self.buckets and self.spec_tokens) or self.has_work():
            return
        dev = self.device
        for T, start in [(self.spec_tokens + 1, 1)] + [(k + 1, 2) for k in self.draft_buckets]:
            # start 1, then 2: the first graph is specialized to the cache length, later ones general in it
            ids = torch.zeros(1, T, dtype=torch.long, device=dev)
            pos = torch.arange(start, start + T, device=dev)[None]
            self.mask[0, : start + T] = True
            mask = self.mask[:1, : start + T]  # a view of the scheduler's mask, as in _speculate (same guards)
            view = self.cache.rows(1)
            for t, dim in ((ids, 0), (ids, 1), (mask, 0), (pos, 0), (pos, 1), (view.kv, 1)):
                torch._dynamo.mark_static(t, dim)
            self._decode_call(ids, attention_mask=mask, position_ids=pos, cache=view, start_pos=start)
        self.mask.zero_()
        self.cursor = 0

    def _decode_call(self, *args, **kwargs):
        """One decode step; compiled steps run with dynamo's recompile limit raised to a graph per bucket."""
        if not self.buckets:
            return self.decode_fn(*args, **kwargs)
        import torch._dynamo.config as dynamo_config

        if dynamo_config.recompile_limit >= self.recompile_limit:
            return self.decode_fn(*args, **kwargs)
        with dynamo_config.patch(recompile_limit=self.recompile_limit):
            return self.decode_fn(*args, **kwargs)

    def _decode_rows(self, n: int) -> int:
        """Rows a decode step runs: the slot prefix holding every active row, rounded up to a bucket when steps
        are compiled (a graph per bucket, not per batch size; the extra rows decode ignored tokens)."""
        return next((b for b in self.buckets if b >= n), n)

    def _deliver(self, slots: list[int], toks, lps, tids, tlps) -> None:
        """The one host sync of a block: hand each row's tokens to its sequence, free the finished rows."""
        tok_SB = torch.stack(toks).tolist()
        lp_SB = torch.stack(lps).tolist() if lps[0] is not None else None
        tid_SBK = torch.stack(tids).tolist() if tids[0] is not None else None
        tlp_SBK = torch.stack(tlps).tolist() if tlps[0] is not None else None
        for j, slot in enumerate(slots):
            seq = self.slots[slot]
            if seq is None:
                continue
            for s in range(len(tok_SB)):
                if seq.finished:
                    break
                top = None
                if tid_SBK is not None and seq.params.logprobs:
                    n = seq.params.logprobs
                    top = dict(zip(tid_SBK[s][j][:n], tlp_SBK[s][j][:n]))
                seq.push(tok_SB[s][j], lp_SB[s][j] if lp_SB is not None else None, top)
            if seq.finished:
                self._release(slot)
            else:
                seq.notify()

    def _compact(self) -> None:
        """Gather each active row's entries to the right end of a shorter prefix; the cursor moves back."""
        active = self.active
        counts = self.mask.sum(1).tolist()
        new_cursor = max((counts[i] for i in active), default=0)
        for i in active:
            idx = self.mask[i].nonzero()[:, 0]
            entries = self.cache.kv[:, i, idx].clone()
            self.mask[i] = False
            self.cache.kv[:, i, new_cursor - len(idx):new_cursor] = entries
            self.mask[i, new_cursor - len(idx):new_cursor] = True
        if not active:
            self.mask.zero_()
        self.cursor = new_cursor
