"""Sampling parameters and a batched, sync-free next-token sampler.

Shape legend: B rows of the batch, V vocabulary, K top logprobs.

Every row carries its own temperature, top-p, top-k, repetition penalty and seed as device tensors, so one call
samples the whole batch without a host sync. Randomness is a counter-based hash of ``(seed, step, token id)``
(Gumbel-max over it), not a stateful generator: a request's samples depend only on its seed and logits, whatever
batch it shares, and are the same on CPU and CUDA.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from dscoder.errors import DscoderError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 turn those filters off; ``repetition_penalty`` > 1
    discourages tokens already in the prompt or output (CTRL's rule: divide positive logits, multiply negative
    ones). ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, in [-2, 2]) lower the logit of every token the
    output already holds by ``presence + frequency * count`` (the generated tokens only, as OpenAI and vLLM do).
    ``stop`` strings end the text before the match; ``stop_token_ids`` (and eos unless ``ignore_eos``) end
    it after that token, which is not shown. ``logprobs``: None for none, 0 for the chosen token's log-probability,
    n > 0 for the n most likely tokens too (log-softmax of the model's logits, before any sampling filter).
    ``seed`` None draws a random seed.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    stream: bool = field(default=False, compare=False)

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.seed is None:
            object.__setattr__(self, "seed", random.getrandbits(31))
        self.validate()

    def validate(self) -> None:
        def bad(name, want):
            raise DscoderError(f"{name}: expected {want}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "an integer >= 0")
        if not _is_num(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", "a number in [0, 100]")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not _is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            bad("repetition_penalty", "a number in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if not _is_int(self.seed):
            bad("seed", "an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "token ids >= 0")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "None or an integer in [0, 20]")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class RowParams:
    """The sampling parameters of the batch rows as device tensors (``[B]`` each)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    penalty: torch.Tensor
    seed: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor

    @classmethod
    def empty(cls, batch: int, device) -> RowParams:
        f = dict(dtype=torch.float32, device=device)
        return cls(torch.zeros(batch, **f), torch.ones(batch, **f), torch.zeros(batch, dtype=torch.long, device=device),
                   torch.ones(batch, **f), torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, **f), torch.zeros(batch, **f))

    def set_row(self, row: int, p: SamplingParams) -> None:
        self.temperature[row] = p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = p.top_k
        self.penalty[row] = p.repetition_penalty
        self.seed[row] = p.seed & 0x7FFFFFFF
        self.presence[row] = p.presence_penalty
        self.frequency[row] = p.frequency_penalty

    def index(self, rows: torch.Tensor) -> RowParams:
        return RowParams(*(t[rows] for t in (self.temperature, self.top_p, self.top_k, self.penalty, self.seed,
                                             self.presence, self.frequency)))


@dataclass(frozen=True)
class Needs:
    """Which sampler stages any row of the batch uses (host-side knowledge, so no sync to find out)."""

    sampling: bool = False   # some row has temperature > 0
    filtering: bool = False  # some row has top-k or top-p
    penalty: bool = False    # some row has repetition_penalty != 1
    counts: bool = False     # some row has a presence or frequency penalty
    top_logprobs: int = -1   # -1: no logprobs; 0: chosen token only; n: top n too

    @classmethod
    def of(cls, params: list[SamplingParams]) -> Needs:
        lp = [p.logprobs for p in params if p.logprobs is not None]
        return cls(sampling=any(p.temperature > 0 for p in params),
                   filtering=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params),
                   penalty=any(p.repetition_penalty != 1 for p in params),
                   counts=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
                   top_logprobs=max(lp) if lp else -1)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``x < 2**32`` in int64 without overflow (split x into 16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) over int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed_B: torch.Tensor, step_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, V]`` uniforms in (0, 1), a pure function of (seed, step, token id)."""
    ids = torch.arange(vocab, device=seed_B.device, dtype=torch.long)
    h = _hash32((seed_B[:, None] * 0x9E3779B1 + step_B[:, None]) & _MASK32)
    h = _hash32(h ^ _hash32(ids[None, :] + 0x632BE5AB))
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    p = penalty_B[:, None]
    penalised = torch.where(logits_BV > 0, logits_BV / p, logits_BV * p)
    return torch.where(seen_BV, penalised, logits_BV)


def apply_count_penalties(logits_BV: torch.Tensor, counts_BV: torch.Tensor, presence_B: torch.Tensor,
                          frequency_B: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the counts of the tokens generated so far."""
    return logits_BV - frequency_B[:, None] * counts_BV - presence_B[:, None] * (counts_BV > 0)


def sample(logits_BV: torch.Tensor, rows: RowParams, step_B: torch.Tensor, needs: Needs,
           seen_BV: torch.Tensor | None = None, counts_BV: torch.Tensor | None = None):
    """One token per row. Returns ``(token_B, logprob_B | None, top_ids_BK | None, top_logprobs_BK | None)``."""
    logits = logits_BV.float()
    logprob_BV = torch.log_softmax(logits, dim=-1) if needs.top_logprobs >= 0 else None
    if needs.penalty and seen_BV is not None:
        logits = apply_repetition_penalty(logits, seen_BV, rows.penalty)
    if needs.counts and counts_BV is not None:
        logits = apply_count_penalties(logits, counts_BV, rows.presence, rows.frequency)
    token = logits.argmax(dim=-1)
    if needs.sampling:
        greedy = rows.temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, rows.temperature)[:, None]
        if needs.filtering:
            scaled = _filter_top_k_top_p(scaled, rows.top_k, rows.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(rows.seed, step_B, logits.shape[-1])))
        sampled = (scaled + gumbel).argmax(dim=-1)
        token = torch.where(greedy, token, sampled)
    if logprob_BV is None:
        return token, None, None, None
    chosen = logprob_BV.gather(1, token[:, None])[:, 0]
    if needs.top_logprobs > 0:
        top_lp, top_ids = logprob_BV.topk(needs.top_logprobs, dim=-1)
        return token, chosen, top_ids, top_lp
    return token, chosen, None, None


def _filter_top_k_top_p(scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside a row's top-k and outside its top-p nucleus (the top token always stays)."""
    sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
    rank = torch.arange(scaled_BV.shape[-1], device=scaled_BV.device)[None, :]
    k = torch.where(top_k_B > 0, top_k_B, scaled_BV.shape[-1])[:, None]
    drop = rank >= k
    probs = torch.softmax(sorted_BV.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    drop = drop | (before >= top_p_B[:, None])
    drop[:, 0] = False
    keep_sorted = sorted_BV.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled_BV).scatter_(1, order_BV, keep_sorted)
