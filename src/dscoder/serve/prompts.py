"""Prompts to token ids without stalling the server: a text that cannot fit the context is refused before it is
tokenized (from its length in characters, see :class:`~dscoder.serve.state.ServerState`), and tokenizing runs on a
worker thread so the event loop keeps answering (``/health``, other clients) meanwhile."""

from __future__ import annotations

from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from dscoder.errors import DscoderError
from dscoder.serve.errors import APIError
from dscoder.serve.state import ServerState


def _too_long(state: ServerState, what: str, tokens: int, at_least: bool = False) -> APIError:
    return APIError(400, f"the {what} has {'at least ' if at_least else ''}{tokens} tokens; this model's context "
                         f"holds {state.max_len} (prompt + at least 1 generated token)", param="prompt",
                    code="context_length_exceeded")


def check_text_size(state: ServerState, chars: int, what: str = "prompt") -> None:
    """Refuse ``chars`` characters of prompt text that must be at least ``max_len`` tokens, without tokenizing."""
    at_least = -(-chars // state.chars_per_token)
    if at_least >= state.max_len:
        raise _too_long(state, what, at_least, at_least=True)


def check_ids(state: ServerState, ids: list[int], what: str = "prompt") -> None:
    if len(ids) >= state.max_len:
        raise _too_long(state, what, len(ids))


async def tokenize(fn: Callable[..., list[int]], *args) -> list[int]:
    """``fn(*args)`` (an engine prompt builder) on a worker thread; a :class:`DscoderError` becomes a 400."""
    try:
        return await run_in_threadpool(fn, *args)
    except DscoderError as e:
        raise APIError(400, str(e)) from None


async def prompt_ids(state: ServerState, prompt: str | list[int], what: str = "prompt") -> list[int]:
    """A completion prompt, text or token ids, checked against the context."""
    if isinstance(prompt, str):
        check_text_size(state, len(prompt), what)
        ids = await tokenize(state.engine.encode_prompt, prompt)
    else:
        check_ids(state, prompt, what)
        try:
            ids = state.engine.encode_prompt(prompt)
        except DscoderError as e:
            raise APIError(400, str(e), param="prompt") from None
    check_ids(state, ids, what)
    return ids


async def fim_ids(state: ServerState, prefix: str, suffix: str) -> list[int]:
    """DeepSeek's fill-in-the-middle prompt for ``prefix`` and ``suffix``, checked against the context."""
    check_text_size(state, len(prefix) + len(suffix))
    ids = await tokenize(state.engine.fim_ids, prefix, suffix)
    check_ids(state, ids)
    return ids


async def chat_ids(state: ServerState, messages: list[dict]) -> list[int]:
    """The chat template over ``messages`` ([{"role", "content": str}]), checked against the context."""
    check_text_size(state, sum(len(m["content"]) for m in messages))
    ids = await tokenize(state.engine.chat_ids, messages)
    check_ids(state, ids)
    return ids


async def text_ids(state: ServerState, text: str) -> list[int]:
    """Plain text (no bos, special-token strings as bytes), e.g. the start of an infill's middle."""
    check_text_size(state, len(text))
    if state.engine.tokenizer is None:
        raise APIError(400, "this server has no tokenizer: send token ids")
    return await tokenize(state.engine.tokenizer.encode, text)
