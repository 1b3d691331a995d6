"""What every route shares: the engine, the served model's name, the limits, and the count of requests in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dscoder.serve.errors import APIError

if TYPE_CHECKING:
    from dscoder.engine import Engine

# A request body may hold this many bytes per token of the context, plus BODY_SLACK: real prompts take 3-5 bytes per
# token as JSON (code, escapes included), so a body over the cap cannot be one context's worth of prompt in practice.
BODY_BYTES_PER_TOKEN = 32
BODY_SLACK = 1 << 20
MAX_SEQUENCES = 256  # prompts x n in one request


@dataclass
class Limits:
    """``max_tokens``: the largest ``max_tokens`` a request may ask (and the default when it asks none);
    ``max_concurrent``: requests in flight before new ones get 429; ``max_body_bytes``: the largest request body
    (413 above it; ``None``: ``BODY_BYTES_PER_TOKEN`` per token of the context + ``BODY_SLACK``)."""

    max_tokens: int = 4096
    max_concurrent: int = 64
    max_body_bytes: int | None = None


class ServerState:
    """The routes' shared state (``app.state.serve``). ``chars_per_token`` is the longest token's length in
    characters, so a text of ``c`` characters has at least ``c / chars_per_token`` tokens: prompts that cannot fit
    the context are refused before they are tokenized (see :mod:`dscoder.serve.prompts`)."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.in_flight = 0
        self.chars_per_token = longest_token_chars(engine.tokenizer)

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def body_limit(self) -> int:
        if self.limits.max_body_bytes is not None:
            return self.limits.max_body_bytes
        return BODY_BYTES_PER_TOKEN * self.max_len + BODY_SLACK

    def explain_body_limit(self, limit: int) -> str:
        if self.limits.max_body_bytes is not None:
            return "the server's max_body_bytes"
        return f"{BODY_BYTES_PER_TOKEN} bytes per token of the {self.max_len}-token context + {BODY_SLACK >> 20} MiB"

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"model '{name}' does not exist (this server serves '{self.model_name}')",
                           param="model", code="model_not_found")

    def check_max_tokens(self, value: int | None, field: str = "max_tokens") -> int:
        """``value``, or the cap when the request asks none; above the cap is a 400."""
        if value is None:
            return self.limits.max_tokens
        if value > self.limits.max_tokens:
            raise APIError(400, f"{field} is {value}; this server allows at most {self.limits.max_tokens}",
                           param=field, code="max_tokens_exceeded")
        return value

    def check_sequences(self, count: int) -> None:
        if count > MAX_SEQUENCES:
            raise APIError(400, f"this request asks for {count} completions (prompts x n); at most {MAX_SEQUENCES}",
                           param="n")

    def admit(self) -> None:
        """Count one more request in flight, or refuse it with 429 at ``limits.max_concurrent``; pair with
        :meth:`release`."""
        if self.in_flight >= self.limits.max_concurrent:
            raise APIError(429, f"too many requests in flight (limit {self.limits.max_concurrent}); retry later",
                           "rate_limit_error", code="too_many_requests")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def state_of(request) -> ServerState:
    """The state of the app serving ``request`` (set by :func:`dscoder.serve.app.create_app`)."""
    return request.app.state.serve


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: a byte-level token's string has one character per byte and a
    text decodes to at most one character per byte; added (special) tokens are their literal strings. A normalizer
    could compose characters (NFC joins up to 3 into 1), so its presence widens the bound."""
    if tokenizer is None:
        return 1
    backend = tokenizer.backend
    longest = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)
    return longest * (3 if backend.normalizer is not None else 1)
