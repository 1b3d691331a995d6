"""Prompts to token ids without stalling the server: a text that cannot fit the context is refused before it is
tokenized (from its length in characters, see :class:`~dscoder.serve.state.ServerState`), and tokenizing runs on a
worker thread so the event loop keeps answering (``/health``, other clients) meanwhile."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from dscoder.errors import DscoderError
from dscoder.serve.errors import APIError
from dscoder.serve.state import ServerState
from dscoder.tokenizer import FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN, fim_layout


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


async def prompt_ids(state: ServerState, prompt: str | list[int], what: str = "prompt",
                     special: bool = False) -> list[int]:
    """A completion prompt, text or token ids, checked against the context. ``special``: special-token strings in a
    text prompt (``<｜fim▁begin｜>``, ...) become their tokens, as llama.cpp's and vLLM's completion routes parse them
    (editors render DeepSeek's FIM template into the prompt); else they stay text."""
    if isinstance(prompt, str):
        check_text_size(state, len(prompt), what)
        tok = state.engine.tokenizer
        if special and tok is not None and any(c in prompt for c in _control_strings(tok)):
            ids = await tokenize(lambda t: tok.encode(t, add_bos=tok.add_bos_token, allow_special=True), prompt)
        else:  # without control-token strings both encodings are the same
            ids = await tokenize(state.engine.encode_prompt, prompt)
    else:
        check_ids(state, prompt, what)
        try:
            ids = state.engine.encode_prompt(prompt)
        except DscoderError as e:
            raise APIError(400, str(e), param="prompt") from None
    check_ids(state, ids, what)
    return ids


def _control_strings(tok) -> list[str]:
    """The control tokens' strings (bos, eos, pad, the FIM sentinels) that a prompt may spell."""
    return [t for t in (tok.bos_token, tok.eos_token, tok.pad_token, FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN) if t]


async def chat_ids(state: ServerState, messages: list[dict]) -> list[int]:
    """The chat template over ``messages`` ([{"role", "content": str}]), checked against the context."""
    check_text_size(state, sum(len(m["content"]) for m in messages))
    ids = await tokenize(state.engine.chat_ids, messages)
    check_ids(state, ids)
    return ids


# ----- the one FIM prompt builder behind /infill, /v1/completions, /beta/completions and /api/generate ---------------
FIM_BATCH = 2048  # llama.cpp server's default n_batch: the budget for prefix + typed text + suffix when truncating
INSTRUCT_NAME = re.compile(r"instruct|chat", re.IGNORECASE)


@dataclass
class FimPrompt:
    """A FIM prompt ready to submit: ``ids``; ``truncated`` when any part was cut to fit; the tokens kept of each
    part; the repository-context chunks kept and dropped; ``warning`` when the checkpoint is not a FIM-trained one."""

    ids: list[int]
    truncated: bool
    n_prefix: int
    n_suffix: int
    n_typed: int
    n_extra: int
    chunks_kept: int
    chunks_dropped: int
    warning: str | None


def _need_tokenizer(state: ServerState):
    tok = state.engine.tokenizer
    if tok is None:
        raise APIError(400, "this server has no tokenizer: send token ids")
    return tok


def fim_warning(state: ServerState) -> str | None:
    """A warning when the served checkpoint looks like a chat/instruct one, or None: only DeepSeek-Coder(-V2)'s Base
    checkpoints were trained with fill-in-the-middle. Judged by name (the served model name and the checkpoint's
    directory, ``state.checkpoint`` when set): the chat template says nothing here, since a checkpoint without one
    gets DeepSeek's template from :class:`~dscoder.tokenizer.Tokenizer` anyway."""
    for name in (getattr(state, "checkpoint", None), state.model_name):
        match = INSTRUCT_NAME.search(str(name or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
        if match:
            return (f"the served checkpoint looks like a chat/instruct model (its name has '{match.group(0)}'): only "
                    f"DeepSeek-Coder Base checkpoints were trained with fill-in-the-middle, so infills from it are "
                    f"unreliable; serve a Base checkpoint for code completion")
    return None


def extra_chunk_text(filename: str, text: str) -> str:
    """One repository-context chunk as the model sees it: a ``# path`` comment line, then the text, ending in a
    newline. DeepSeek's vocabulary has no file-separator token; its repository-level pre-training data and its README's
    repository completion example put each file after a comment with its path, so that is the form used here."""
    head = f"# {filename}\n" if filename else ""
    return head + text + ("" if text.endswith("\n") or not text else "\n")


def _chunks(extra) -> list[tuple[str, str]]:
    out = []
    for k, c in enumerate(extra):
        if isinstance(c, Mapping):
            filename, text = c.get("filename", ""), c.get("text", "")
        elif isinstance(c, Sequence) and not isinstance(c, str) and len(c) == 2:
            filename, text = c
        else:
            raise APIError(400, f"input_extra.{k}: expected an object with 'filename' and 'text'",
                           param=f"input_extra.{k}")
        if not isinstance(filename, str) or not isinstance(text, str):
            raise APIError(400, f"input_extra.{k}: 'filename' and 'text' must be strings", param=f"input_extra.{k}")
        out.append((filename, text))
    return out


async def fim_request_ids(state: ServerState, prefix: str, suffix: str, extra=(), typed: str = "",
                          n_predict: int | None = None, truncate: bool = False) -> FimPrompt:
    """The FIM prompt ``[bos] <｜fim▁begin｜> extra... prefix typed <｜fim▁hole｜> suffix <｜fim▁end｜>``.

    ``extra``: repository context, ``(filename, text)`` pairs or ``{"filename", "text"}`` objects, oldest first,
    each rendered by :func:`extra_chunk_text` inside the fim_begin span, before the prefix (other files come before
    the current one, as in repository-level pre-training). ``typed``: the typed part of the cursor's line (llama.cpp's
    ``prompt``), encoded on its own and placed at the end of the prefix, as llama.cpp does. ``n_predict``: tokens the
    caller will ask for (room kept for them when budgeting the extra context).

    ``truncate=False`` (OpenAI, DeepSeek): a prompt that cannot fit the context is a 400. ``truncate=True`` (llama.cpp
    ``/infill``) budgets as llama.cpp's server does: with ``batch = min(FIM_BATCH, context - specials - 1)``, the
    prefix keeps its last ``3/4 batch`` tokens, the suffix its first ``batch/4 - 2 - typed`` tokens (typed itself at
    most ``batch/4 - 2``), and extra chunks fill up to ``context - batch - 2 n_predict`` tokens (and what the context
    has left), newest first, whole chunks only (llama.cpp cuts the token tail, which can lose a chunk's file name).
    Texts are cut by characters first (a text of c characters has at least ``c / chars_per_token`` tokens), so a
    huge prefix is never tokenized whole. ``truncated`` says whether anything was cut."""
    tok = _need_tokenizer(state)
    if not tok.has_fim:
        raise APIError(400, "this model's tokenizer has no FIM tokens: fill-in-the-middle is not available")
    chunks = _chunks(extra)
    ctx, cpt = state.max_len, state.chars_per_token
    specials = 3 + (1 if tok.add_bos_token else 0)
    if not truncate:
        check_text_size(state, len(prefix) + len(suffix) + len(typed) + sum(len(extra_chunk_text(*c)) for c in chunks))
    batch = min(FIM_BATCH, ctx - specials - 1)
    if truncate and batch < 4:
        raise APIError(400, f"this server's context ({ctx} tokens) is too short for a FIM prompt",
                       code="context_length_exceeded")
    room = max(n_predict or 0, 0)

    def build() -> FimPrompt:
        cut = False
        if truncate:  # cut by characters before tokenizing (bounds the tokenizer's work), then by tokens
            quarter = batch // 4
            limits = {"prefix": 3 * quarter, "typed": max(0, quarter - 2), "suffix": quarter}
            texts = {"prefix": prefix, "typed": typed, "suffix": suffix}
            for key, n in limits.items():
                keep = (n + 1) * cpt
                if len(texts[key]) > keep:
                    texts[key] = texts[key][:keep] if key == "suffix" else texts[key][-keep:]
                    cut = True
            p, t, s = (tok.encode(texts[k]) for k in ("prefix", "typed", "suffix"))
            t_take = min(len(t), limits["typed"])
            s_take = min(len(s), max(0, quarter - (2 + t_take)))
            p_take = min(len(p), limits["prefix"])
            cut = cut or (t_take, s_take, p_take) != (len(t), len(s), len(p))
            p, t, s = p[len(p) - p_take:], t[len(t) - t_take:], s[:s_take]
            used = specials + len(p) + len(t) + len(s)
            budget = min(max(0, ctx - batch - 2 * room), ctx - 1 - used)
        else:
            p, t, s = tok.encode(prefix), tok.encode(typed), tok.encode(suffix)
            budget = None
        kept: list[list[int]] = []
        for filename, text in reversed(chunks):  # newest first
            chunk = extra_chunk_text(filename, text)
            if budget is not None:
                left = budget - sum(map(len, kept))
                if -(-len(chunk) // cpt) > left:
                    break
                ids = tok.encode(chunk)
                if len(ids) > left:
                    break
            else:
                ids = tok.encode(chunk)
            kept.append(ids)
        kept.reverse()
        extra_ids = [i for ids in kept for i in ids]
        head = [tok.bos_id] if tok.add_bos_token else []
        ids = [*head, *fim_layout([*extra_ids, *p, *t], s, [], (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id))]
        dropped = len(chunks) - len(kept)
        return FimPrompt(ids, cut or dropped > 0, len(p), len(s), len(t), len(extra_ids), len(kept), dropped,
                         fim_warning(state))

    try:
        out = await run_in_threadpool(build)
    except DscoderError as e:
        raise APIError(400, str(e)) from None
    check_ids(state, out.ids)
    return out
