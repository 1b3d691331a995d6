"""The inference engine: a model, its tokenizer and the continuous-batching scheduler, run by the threads that wait.

    engine = Engine("path/to/checkpoint")                       # or a DeepseekV2 model and a Tokenizer
    engine.generate("def fib(n):", max_tokens=64).text
    engine.generate(["a", "b"], temperature=0.8, top_p=0.95, seed=1)   # a list in, a list of Completions out
    engine.infill("def f(x):\\n    ", "\\n    return y")             # DeepSeek's FIM template
    engine.chat([{"role": "user", "content": "Write quicksort"}])
    for chunk in engine.stream("import os"): print(chunk.text, end="")

Every public call is thread-safe: requests from many threads (the server's) join the same batch.

Who runs the model: a caller that waits (``generate``, ``infill``, ``chat``, ``wait``, iterating a ``stream``)
drives the scheduler on its own thread until its requests are done, unless another thread is driving already,
in which case it waits for that one. Requests submitted with ``background=True`` (the server's) are driven by
:meth:`Engine.run_loop` where one runs (``dscoder serve`` runs it on the main thread), else by a background
thread the engine starts. Computing on the caller's thread matters on CPU: with GNU OpenMP, a second thread
doing parallel work next to the main thread's idle team makes every parallel region wake sleeping workers:
decode steps were 1.3x (batch 1) and 2x (batch 8) slower on a 2-core machine (``benchmarks/bench_decode.py
--driver thread`` shows it end to end).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dscoder.engine.batch import Completion, Scheduler, Sequence
from dscoder.engine.sampling import SamplingParams
from dscoder.errors import DscoderError

# Inductor options for the decode step: one-row matmuls (batch-1 decode) become fused multiply-and-sum kernels, which
# stream weights faster than a BLAS GEMV call on CPU (about 1.5x on the benchmark machine).
COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}

# Draft tokens per speculative verify step (prompt lookup; see Scheduler._speculate and bench_speculative.py).
SPEC_TOKENS = 8

_SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs"}


def engine_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device` an engine can run on, or a one-line DscoderError saying why not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DscoderError(f"device {str(device)!r}: not a device name (expected e.g. cpu, cuda, cuda:1, mps)") \
            from None
    if d.type == "meta":
        raise DscoderError("device 'meta': an engine needs a device that holds weights (cpu, cuda, ...)")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DscoderError(f"device {str(device)!r}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DscoderError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise DscoderError(f"device {str(device)!r}: MPS is not available on this machine")
    return d


@dataclass
class StreamChunk:
    """A piece of a streamed completion: new ``text`` and ``token_ids``; ``finish_reason`` set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class Engine:
    """Generation over the latent cache with continuous batching.

    ``source``: a checkpoint directory (its tokenizer is loaded from it when present), a preset name (random
    weights), or a :class:`~dscoder.DeepseekV2`. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...) is where the
    model and the cache live: a given model is moved there (in place, as ``Module.to`` does); None keeps a given
    model where it is and loads onto the CPU. ``max_batch_size`` rows decode together; ``max_len`` (default:
    the model's context, at most 4096) bounds prompt + output and sizes the cache. ``sync_every`` decode steps run
    between host syncs (streamed requests sync every step). ``compile`` runs decode steps through ``torch.compile``
    (prefill stays eager): the first steps at each batch bucket (1, 2, 4, ...) compile (seconds to a minute; see
    :meth:`warmup`), later ones are faster, see ``benchmarks/bench_decode.py``. ``prefix_cache_mb`` > 0 keeps the cache entries of prompt prefixes (blocks of
    32 tokens, least recently used dropped first): a prompt that starts like an earlier one (a chat's history, an
    editor's file prefix) prefills only what follows. Off by default: a cached prefix is numerically equal only up
    to rounding (a prefill in chunks against one in one go). ``prefill_chunk`` > 0 prefills a longer prompt
    that many tokens per scheduler step, between decode steps of the running requests, so a long prompt does not
    stall their streams (0: in one go). ``speculative`` (default on) runs prompt-lookup speculative decoding
    when one greedy request decodes alone: up to 8 tokens copied from earlier in the prompt or output are checked in
    one forward pass and the ones the model agrees with are kept, so the tokens are those of plain greedy decoding
    (``benchmarks/bench_speculative.py``); batches of several rows and sampled requests decode plainly.
    """

    def __init__(self, source, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, max_batch_size: int = 8, max_len: int | None = None,
                 sync_every: int = 8, compile: bool = False, prefix_cache_mb: int = 0, prefill_chunk: int = 0,
                 speculative: bool = True):
        from dscoder.model import DeepseekV2
        from dscoder.model.build import load_model
        from dscoder.model.checkpoint import parse_dtype
        from dscoder.tokenizer import Tokenizer

        target = None if device is None else engine_device(device)
        if isinstance(source, DeepseekV2):
            if next(source.parameters()).device.type == "meta":
                raise DscoderError("the model is on the meta device (it has no weights): build or load it on a real "
                                   "device, e.g. dscoder.load_model(..., device='cpu')")
            model = source.eval().to(device=target, dtype=parse_dtype(dtype))  # in place, as Module.to is
        else:
            model = load_model(source, dtype=dtype, device=target or "cpu")
            if tokenizer is None and isinstance(source, (str, Path)) and (Path(source) / "tokenizer.json").is_file():
                tokenizer = Tokenizer.load(source)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.load(tokenizer)
        for name, value in (("max_batch_size", max_batch_size), ("sync_every", sync_every)):
            if not isinstance(value, int) or value < 1:
                raise DscoderError(f"{name}: expected an integer >= 1, got {value!r}")
        for name, value in (("prefix_cache_mb", prefix_cache_mb), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DscoderError(f"{name}: expected an integer >= 0, got {value!r}")
        if not isinstance(speculative, bool):
            raise DscoderError(f"speculative: expected true or false, got {speculative!r}")
        context = model.config.max_position_embeddings
        max_len = min(context, 4096) if max_len is None else max_len
        if not isinstance(max_len, int) or not 2 <= max_len <= context:
            raise DscoderError(f"max_len: expected an integer in [2, {context}] (the model's context), got {max_len!r}")
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.eos_id = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
        pad = tokenizer.pad_id if tokenizer is not None else (self.eos_id or 0)
        # torch.compile is lazy: the scheduler compiles on its first steps at each bucket, under its own
        # recompile limit (see Scheduler); constructing the engine changes no torch setting. The one process-wide
        # change: a compiled engine sets TORCHINDUCTOR_CACHE_DIR when unset, so its graphs persist under the user's
        # cache (dscoder.engine.native.cache_root) instead of /tmp.
        if compile:
            from dscoder.engine.native import use_persistent_inductor_cache

            use_persistent_inductor_cache()
        decode_fn = torch.compile(model, options=COMPILE_OPTIONS) if compile else None
        self.scheduler = Scheduler(model, max_batch=max_batch_size, max_len=max_len, sync_every=sync_every,
                                   pad_id=pad, decode_fn=decode_fn, prefix_cache_bytes=prefix_cache_mb << 20,
                                   prefill_chunk=prefill_chunk, spec_tokens=SPEC_TOKENS if speculative else 0)
        self._cv = threading.Condition()
        self._driver: int | None = None  # ident of the thread running scheduler steps now
        self._background: set[Sequence] = set()  # requests no caller waits for (driven by run_loop)
        self._loop_running = False  # run_loop (on a caller's thread) or our own thread drives background requests
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----- prompts --------------------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise DscoderError("this engine has no tokenizer: pass tokenizer= (a directory or a Tokenizer), "
                               "or give prompts as lists of token ids")
        return self.tokenizer

    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a text prompt (bos first when the tokenizer adds one) or a list of ids as given."""
        if isinstance(prompt, str):
            tok = self._need_tokenizer()
            return tok.encode(prompt, add_bos=tok.add_bos_token)
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise DscoderError(f"a prompt must be a string or a non-empty list of token ids in [0, {vocab})")
        return ids

    def fim_ids(self, prefix: str, suffix: str) -> list[int]:
        """``bos <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>``: prefix and suffix encoded as plain text."""
        tok = self._need_tokenizer()
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise DscoderError("infill: prefix and suffix must be strings")
        head = [tok.bos_id] if tok.add_bos_token else []
        # the layout training uses (dscoder.tokenizer.fim_layout); a clear error if the tokenizer has no FIM tokens
        return [*head, *tok.fim_ids(prefix, suffix)]

    def chat_ids(self, messages: Seq[Mapping[str, Any]]) -> list[int]:
        """The DeepSeek-Coder-V2 chat prompt, ending in ``Assistant:`` (no trailing space)."""
        tok = self._need_tokenizer()
        # Encoded as one string, as transformers' apply_chat_template + encode does (segment-wise encoding would
        # split whitespace differently); a special-token string inside a message becomes a control token there too.
        return tok.encode(tok.apply_chat_template(messages), allow_special=True)

    # ----- requests -------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_update=None, *,
               background: bool = False) -> Sequence:
        """Queue one request; ``on_update(seq, delta_text, new_ids, finished)`` runs on the driving thread.

        The request advances while a thread drives the engine: pass the returned sequence to :meth:`wait`, or
        submit with ``background=True`` to have :meth:`run_loop` (or the engine's own thread) drive it."""
        self._check_length(prompt_ids)
        seq = Sequence(prompt_ids, params, self.max_len, self.eos_id, self.tokenizer, on_update)
        with self._cv:
            if self._closed:
                raise DscoderError("the engine is closed")
            self.scheduler.add(seq)
            if background:
                self._background = {s for s in self._background if not s.done.is_set()} | {seq}
                if not self._loop_running:
                    self._loop_running = True
                    self._thread = threading.Thread(target=self._loop, name="dscoder-engine", daemon=True)
                    self._thread.start()
            self._cv.notify_all()
        return seq

    def _check_length(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) >= self.max_len:
            raise DscoderError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_len} "
                               f"(prompt + at least 1 generated token)")

    # ----- driving ------------------------------------------------------------------------------------------
    def _drive(self, done) -> None:
        """Run scheduler steps on this thread until ``done()``; while another thread drives, wait for it."""
        me = threading.get_ident()
        while True:
            with self._cv:
                while True:
                    if done():
                        return
                    if self._closed and self._fail_if_idle():
                        continue  # every request has ended now
                    if self._driver is None and self.scheduler.has_work():
                        self._driver = me
                        break
                    self._cv.wait()
            try:
                while not done() and not self._closed and self.scheduler.has_work():
                    try:
                        self.scheduler.step()
                    except Exception as e:  # a model failure ends the requests in flight, not the engine
                        self.scheduler.fail_all(e)
                    with self._cv:
                        self._cv.notify_all()
            finally:
                with self._cv:
                    self._driver = None
                    self._cv.notify_all()

    def _fail_if_idle(self) -> bool:
        """After close: end what is queued or in flight unless a thread is mid-step (lock held); True if done."""
        if self._driver is not None:
            return False
        self.scheduler.fail_all(DscoderError("the engine was closed"))
        self._cv.notify_all()
        return True

    def _background_idle(self) -> bool:
        # list(): a snapshot (submit may replace the set from another thread; it prunes it under the lock)
        return all(s.done.is_set() for s in list(self._background))

    def run_loop(self, stop: threading.Event | None = None) -> None:
        """Drive ``background=True`` requests on this thread until the engine closes or ``stop`` is set.

        A server runs this on its main thread (the HTTP server in another); without it, the engine starts its own
        thread for them."""
        with self._cv:
            if self._loop_running:
                raise DscoderError("this engine's loop is already running on another thread")
            self._loop_running = True
        self._loop(stop)

    def _loop(self, stop: threading.Event | None = None) -> None:
        stopped = lambda: self._closed or (stop is not None and stop.is_set())  # noqa: E731
        try:
            while not stopped():
                with self._cv:
                    while not stopped() and self._background_idle():
                        self._cv.wait(timeout=0.2)  # short, so a signal (Ctrl-C) on the main thread gets through
                self._drive(lambda: stopped() or self._background_idle())
        finally:
            with self._cv:
                self._loop_running = False
                self._cv.notify_all()

    def wait(self, seqs: Sequence | Seq[Sequence]) -> Completion | list[Completion]:
        """The completions of submitted requests, driving the engine on this thread until they are done."""
        single = isinstance(seqs, Sequence)
        seqs = [seqs] if single else list(seqs)
        self._drive(lambda: all(s.done.is_set() for s in seqs))
        results = [self._result(s) for s in seqs]
        return results[0] if single else results

    def close(self) -> None:
        """Stop the engine: queued and running requests end with an error; later calls are refused."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cv:
            self._fail_if_idle()  # else the driving thread ends them after its step

    @staticmethod
    def _result(seq: Sequence) -> Completion:
        if seq.error is not None:
            raise seq.error if isinstance(seq.error, DscoderError) else RuntimeError(f"generation failed: {seq.error}")
        return seq.result()

    @staticmethod
    def params(**kwargs) -> SamplingParams:
        unknown = set(kwargs) - _SAMPLING_KEYS
        if unknown:
            raise DscoderError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return SamplingParams(**kwargs)

    # ----- public API -----------------------------------------------------------------------------------------
    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]], **sampling) -> Completion | list[Completion]:
        """Complete one prompt (a string or a list of ids → a :class:`Completion`) or a list of them (→ a list).

        Sampling options: ``max_tokens=128, temperature=0.0 (greedy), top_p=1.0, top_k=0, repetition_penalty=1.0,
        seed=None, stop=(), stop_token_ids=(), ignore_eos=False, logprobs=None``. With a seed, a prompt list gives
        every prompt the same seed."""
        single = isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        params = self.params(**sampling)
        encoded = [self.encode_prompt(p) for p in batch]
        for ids in encoded:  # check every prompt before queueing any
            self._check_length(ids)
        results = self.wait([self.submit(ids, params) for ids in encoded])
        return results[0] if single else results

    def infill(self, prefix: str, suffix: str, **sampling) -> Completion:
        """The middle between ``prefix`` and ``suffix`` (fill-in-the-middle, DeepSeek's PSM template)."""
        return self.wait(self.submit(self.fim_ids(prefix, suffix), self.params(**sampling)))

    def chat(self, messages: Seq[Mapping[str, Any]], **sampling) -> Completion:
        """The assistant's reply to ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}])."""
        return self.wait(self.submit(self.chat_ids(messages), self.params(**sampling)))

    def stream(self, prompt: str | Seq[int] | None = None, *, messages=None, prefix: str | None = None,
               suffix: str | None = None, **sampling) -> Iterator[StreamChunk]:
        """Stream one completion: give ``prompt``, or ``messages`` (chat), or ``prefix`` and ``suffix`` (infill).
        Closing the iterator early cancels the request."""
        if messages is not None:
            ids = self.chat_ids(messages)
        elif prefix is not None or suffix is not None:
            ids = self.fim_ids(prefix or "", suffix or "")
        else:
            ids = self.encode_prompt(prompt)
        params = dataclasses.replace(self.params(**sampling), stream=True)
        chunks: queue.Queue = queue.Queue()
        seq = self.submit(ids, params, on_update=lambda s, text, new, done: chunks.put(
            StreamChunk(text, new, s.finish_reason if done else None)))
        return self._iterate(seq, chunks)

    def _iterate(self, seq: Sequence, chunks: queue.Queue) -> Iterator[StreamChunk]:
        try:
            while True:
                self._drive(lambda: not chunks.empty())
                chunk = chunks.get()
                if chunk.finish_reason == "error":
                    self._result(seq)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True

    def warmup(self) -> None:
        """Decode a few steps at every batch bucket, so that a compiled engine compiles its decode graphs now rather
        than on the first requests (see :mod:`dscoder.engine.batch`), and the speculative verify step's graph; an eager
        engine just runs one short request."""
        ids = [0] * min(4, self.max_len - 4)
        for k in self.scheduler.buckets or [1]:
            self.generate([ids] * k, max_tokens=3, ignore_eos=True)
        with self._cv:  # the speculative verify step's graph (when nothing else runs)
            if self._driver is None:
                self.scheduler.warm_verify()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
