"""OpenAI's API: ``GET /v1/models``, ``POST /v1/completions`` (``suffix`` renders DeepSeek's FIM template, as editors
send it) and ``POST /v1/chat/completions``; ``stream`` answers with server-sent events ending in ``data: [DONE]``.
DeepSeek's ``POST /beta/completions`` (completions with ``suffix``, what Continue's DeepSeek provider calls) is the same
route, its usage also in DeepSeek's ``prompt_cache_hit_tokens``/``prompt_cache_miss_tokens``.

Special-token strings in a text ``prompt`` are parsed as those tokens (as vLLM and llama.cpp do: editors render the
FIM template into the prompt); ``suffix`` and chat messages stay text. A FIM request to a checkpoint that looks like a
chat/instruct one gets a ``warning`` in the body and an ``X-Dscoder-Warning`` header (see
:func:`dscoder.serve.prompts.fim_warning`)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dscoder.engine import SamplingParams, Sequence
from dscoder.errors import DscoderError
from dscoder.serve import prompts
from dscoder.serve.errors import APIError
from dscoder.serve.generation import Generation, sse, sse_error
from dscoder.serve.protocol import ChatRequest, CompletionRequest
from dscoder.serve.state import ServerState, state_of

router = APIRouter()


# ----- request checks (no engine work) ------------------------------------------------------------------------------
def sampling_params(state: ServerState, body: CompletionRequest | ChatRequest, max_tokens: int | None,
                    logprobs: int | None, index: int) -> SamplingParams:
    """The engine's sampling parameters for sample ``index`` of ``body``; a value it refuses is a 400 naming it."""
    max_tokens = state.check_max_tokens(max_tokens)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = None if body.seed is None else (body.seed + index) & 0x7FFFFFFF
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              seed=seed,
                              stop=tuple(s for s in stop if s), stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=body.ignore_eos, logprobs=logprobs, stream=body.stream)
    except DscoderError as e:
        raise APIError(400, str(e), param=str(e).split(":")[0]) from None


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each a string or a list of token ids."""
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        return [raw]
    if not raw:
        raise APIError(400, "prompt: expected a string, a list of strings or token ids", param="prompt")
    return list(raw)


def chat_messages(body: ChatRequest) -> list[dict]:
    """``messages`` as [{"role", "content": str}]: text parts are joined; other parts (images) are a 400."""
    messages = []
    for k, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages.{k}.content: only text parts are supported",
                               param=f"messages.{k}.content")
            content = "".join(p["text"] for p in content)
        messages.append({"role": m.role, "content": content})
    return messages


# ----- logprobs in OpenAI's two shapes ------------------------------------------------------------------------------
def _token_text(state: ServerState, token: int) -> str:
    tok = state.engine.tokenizer
    return tok.decode([token]) if tok is not None else str(token)


def completion_logprobs(state: ServerState, seq: Sequence, a: int, b: int) -> dict:
    """Legacy completions' ``logprobs`` for generated tokens ``a:b``."""
    toks = [_token_text(state, t) for t in seq.token_ids[a:b]]
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    tops = seq.top_logprobs[a:b] if seq.top_logprobs is not None else [None] * (b - a)
    return {"tokens": toks, "token_logprobs": seq.logprobs[a:b], "text_offset": offsets,
            "top_logprobs": [None if t is None else _top_by_text(state, t) for t in tops]}


def _top_by_text(state: ServerState, top: dict[int, float]) -> dict[str, float]:
    """OpenAI keys top logprobs by token text; ids that decode alike (partial UTF-8) keep the likeliest."""
    out: dict[str, float] = {}
    for k, v in top.items():
        text = _token_text(state, k)
        out[text] = max(v, out.get(text, float("-inf")))
    return out


def chat_logprobs(state: ServerState, seq: Sequence, a: int, b: int) -> dict:
    """Chat completions' ``logprobs`` for generated tokens ``a:b``."""
    out = []
    tops = seq.top_logprobs[a:b] if seq.top_logprobs is not None else [{}] * (b - a)
    for t, lp, top in zip(seq.token_ids[a:b], seq.logprobs[a:b], tops):
        s = _token_text(state, t)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": _token_text(state, k), "logprob": v,
                                      "bytes": list(_token_text(state, k).encode())} for k, v in top.items()]})
    return {"content": out}


# ----- routes -------------------------------------------------------------------------------------------------------
@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "dscoder", "max_model_len": state.max_len}]}


WARNING_HEADER = "X-Dscoder-Warning"


def _cached(seq: Sequence) -> int:
    return int(getattr(seq, "cached_tokens", 0) or 0)


@router.post("/v1/completions")
@router.post("/beta/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    state.check_model(body.model)
    if body.suffix and body.echo:
        raise APIError(400, "echo cannot be used with suffix", param="echo")
    prompts_in = completion_prompts(body)
    state.check_sequences(len(prompts_in) * body.n)
    params = [sampling_params(state, body, body.max_tokens, body.logprobs, k % body.n)
              for k in range(len(prompts_in) * body.n)]
    texts = []
    for p in prompts_in:
        if isinstance(p, str):
            texts.append(p)
        elif body.suffix or body.echo:  # token ids shown or put in a FIM template as text
            prompts.check_ids(state, p)
            texts.append(await prompts.tokenize(state.engine.tokenizer.decode, p)
                         if state.engine.tokenizer is not None else "")
        else:
            texts.append(None)
    warning = None
    if body.suffix:
        fims = [await prompts.fim_request_ids(state, t, body.suffix) for t in texts]
        prompt_ids, warning = [f.ids for f in fims], fims[0].warning
    else:
        prompt_ids = [await prompts.prompt_ids(state, p, special=True) for p in prompts_in]
        tok = state.engine.tokenizer
        if tok is not None and tok.has_fim and any(tok.fim_begin_id in ids for ids in prompt_ids):
            warning = prompts.fim_warning(state)
    headers = {WARNING_HEADER: warning} if warning else {}
    deepseek = request.url.path.startswith("/beta/")
    ids_all = [ids for ids in prompt_ids for _ in range(body.n)]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [t if body.echo else "" for t in texts]
    gen = Generation(state, ids_all, params)

    def usage() -> dict:
        """OpenAI's usage with the prompt tokens taken from the prefix cache (and DeepSeek's names for them)."""
        out = gen.usage(body.n)
        cached = sum(_cached(s) for s in gen.seqs[::body.n])
        out["prompt_tokens_details"] = {"cached_tokens": cached}
        if deepseek:
            out["prompt_cache_hit_tokens"] = cached
            out["prompt_cache_miss_tokens"] = out["prompt_tokens"] - cached
        return out

    def chunk(i, text, finish=None, logprobs=None):
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    if body.stream:
        async def events():
            for i in range(len(gen.seqs)):
                if echo[i // body.n]:
                    yield sse(chunk(i, echo[i // body.n]))
            async for i, seq, delta, new, done in gen.updates():
                if seq.error is not None:
                    yield sse_error(seq)
                    break
                lp = None
                if body.logprobs is not None and new:
                    lp = completion_logprobs(state, seq, len(seq.token_ids) - len(new), len(seq.token_ids))
                if delta or done or lp:
                    yield sse(chunk(i, delta, seq.finish_reason if done else None, lp))
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk(0, ""), "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        response = gen.stream(events())
        response.headers.update(headers)
        return response
    try:
        await gen.wait(request)
    finally:
        gen.close()
    choices = []
    for i, s in enumerate(gen.seqs):
        lp = completion_logprobs(state, s, 0, len(s.token_ids)) if body.logprobs is not None else None
        choices.append({"index": i, "text": echo[i // body.n] + s.text, "logprobs": lp,
                        "finish_reason": s.finish_reason})
    out = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
           "choices": choices, "usage": usage()}
    if warning:
        out["warning"] = warning
    return JSONResponse(out, headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = state_of(request)
    state.check_model(body.model)
    messages = chat_messages(body)
    state.check_sequences(body.n)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    lp = (body.top_logprobs or 0) if body.logprobs else None
    params = [sampling_params(state, body, max_tokens, lp, k) for k in range(body.n)]
    ids = await prompts.chat_ids(state, messages)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    gen = Generation(state, [ids] * body.n, params)

    def chunk(i, delta, finish=None, logprobs=None):
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    if body.stream:
        async def events():
            for i in range(len(gen.seqs)):
                yield sse(chunk(i, {"role": "assistant", "content": ""}))
            async for i, seq, delta, new, done in gen.updates():
                if seq.error is not None:
                    yield sse_error(seq)
                    break
                lp = chat_logprobs(state, seq, len(seq.token_ids) - len(new), len(seq.token_ids)) \
                    if body.logprobs and new else None
                if delta or lp:
                    yield sse(chunk(i, {"content": delta}, None, lp))
                if done:
                    yield sse(chunk(i, {}, seq.finish_reason))
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk(0, {}), "choices": [], "usage": gen.usage(body.n)})
            yield "data: [DONE]\n\n"
        return gen.stream(events())
    try:
        await gen.wait(request)
    finally:
        gen.close()
    choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                "logprobs": chat_logprobs(state, s, 0, len(s.token_ids)) if body.logprobs else None,
                "finish_reason": s.finish_reason} for i, s in enumerate(gen.seqs)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": gen.usage(body.n)}

