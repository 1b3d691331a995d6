"""An OpenAI-compatible HTTP server over :class:`~dscoder.engine.Engine` (FastAPI + uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (``suffix`` renders DeepSeek's FIM template,
as editors send it), ``POST /v1/chat/completions``, ``POST /infill`` (llama.cpp's, for llama.vscode). ``stream``
answers with server-sent events ending in ``data: [DONE]``. Every error is ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status for the client's mistakes: bad JSON or fields (400), a missing or wrong
bearer token (401), a prompt longer than the context or ``max_tokens`` above the cap (400), too many requests in
flight (429).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dscoder.engine import Engine, SamplingParams, Sequence
from dscoder.errors import DscoderError
from dscoder.serve.protocol import ChatRequest, CompletionRequest, InfillRequest


@dataclass
class Limits:
    """``max_tokens``: the largest ``max_tokens`` a request may ask (and the default when it asks none);
    ``max_concurrent``: requests in flight before new ones get 429."""

    max_tokens: int = 4096
    max_concurrent: int = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def create_app(engine: Engine, *, model_name: str = "dscoder", api_key: str | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="dscoder", docs_url=None, redoc_url=None)
    state = {"in_flight": 0}

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return _error(400, f"{field}: {msg}" if field else msg, "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
                return _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              "authentication_error", code="invalid_api_key")
        return await call_next(request)

    # ----- helpers --------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name):
            raise APIError(404, f"model '{name}' does not exist (this server serves '{model_name}')", param="model",
                           code="model_not_found")

    def params_for(body, max_tokens: int | None, logprobs: int | None, index: int) -> SamplingParams:
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
                           param="presence_penalty")
        if max_tokens is None:
            max_tokens = limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = None if body.seed is None else body.seed + index
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=max(body.top_k, 0), repetition_penalty=body.repetition_penalty,
                                  seed=None if seed is None else seed & 0x7FFFFFFF, stop=tuple(s for s in stop if s),
                                  stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                                  logprobs=logprobs, stream=body.stream)
        except DscoderError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None

    def check_prompt(ids: list[int]) -> None:
        if len(ids) >= engine.max_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds {engine.max_len} "
                                f"(prompt + at least 1 generated token)", param="prompt",
                           code="context_length_exceeded")

    def tokens_from(fn, *args) -> list[int]:
        try:
            return fn(*args)
        except DscoderError as e:
            raise APIError(400, str(e)) from None

    class Slot:
        """Counts a request in flight from admission to its last byte; over the limit it is a 429."""

        def __enter__(self):
            if state["in_flight"] >= limits.max_concurrent:
                raise APIError(429, f"too many requests in flight (limit {limits.max_concurrent}); retry later",
                               "rate_limit_error", code="too_many_requests")
            state["in_flight"] += 1
            return self

        def __exit__(self, *exc):
            state["in_flight"] -= 1

    def start(prompts: list[list[int]], params: list[SamplingParams]) -> tuple[Slot, list[Sequence], asyncio.Queue]:
        """Take a request slot (429 when full) and submit one sequence per prompt; their updates arrive on one asyncio
        queue as (index, delta, ids, done). If a submission fails, the slot is released and the sequences already
        submitted are cancelled."""
        slot = Slot().__enter__()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                def on_update(seq, delta, new, done, i=i):
                    loop.call_soon_threadsafe(updates.put_nowait, (i, delta, new, done))
                seqs.append(engine.submit(ids, p, on_update=on_update, background=True))
        except BaseException:
            for seq in seqs:
                seq.cancelled = True
            slot.__exit__()
            raise
        return slot, seqs, updates

    async def collect(seqs: list[Sequence], updates: asyncio.Queue) -> None:
        left = len(seqs)
        while left:
            _, _, _, done = await updates.get()
            left -= done
        for s in seqs:
            if s.error is not None:
                raise APIError(500, f"generation failed: {s.error}", "server_error")

    def token_text(i: int) -> str:
        return engine.tokenizer.decode([i]) if engine.tokenizer is not None else str(i)

    def usage(seqs: list[Sequence], n: int = 1) -> dict:
        prompt = sum(len(s.prompt_ids) for s in seqs[::n])  # n samples of one prompt count it once
        completion = sum(len(s.token_ids) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def streaming(gen: AsyncIterator[str], slot: Slot, seqs: list[Sequence]) -> StreamingResponse:
        async def body():
            try:
                async for piece in gen:
                    yield piece
            finally:
                for s in seqs:
                    if not s.finished:
                        s.cancelled = True
                slot.__exit__()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ----- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dscoder", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if body.suffix and body.echo:
            raise APIError(400, "echo cannot be used with suffix", param="echo")
        raw = body.prompt
        prompts_in = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not prompts_in:
            raise APIError(400, "prompt: expected a string, a list of strings or token ids", param="prompt")
        if body.suffix:
            prompt_ids = [tokens_from(engine.fim_ids, p if isinstance(p, str) else engine.tokenizer.decode(p),
                                      body.suffix) for p in prompts_in]
        else:
            prompt_ids = [tokens_from(engine.encode_prompt, p) for p in prompts_in]
        for ids in prompt_ids:
            check_prompt(ids)
        ids_all = [ids for ids in prompt_ids for _ in range(body.n)]
        params = [params_for(body, body.max_tokens, body.logprobs, k % body.n) for k in range(len(ids_all))]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [(p if isinstance(p, str) else engine.tokenizer.decode(p)) if body.echo else "" for p in prompts_in]
        slot, seqs, updates = start(ids_all, params)

        def chunk(i, text, finish=None, logprobs=None):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        if body.stream:
            async def events():
                for i in range(len(seqs)):
                    if echo[i // body.n]:
                        yield sse(chunk(i, echo[i // body.n]))
                left = len(seqs)
                while left:
                    i, delta, new, done = await updates.get()
                    left -= done
                    seq = seqs[i]
                    if seq.error is not None:
                        yield sse({"error": {"message": f"generation failed: {seq.error}", "type": "server_error",
                                             "param": None, "code": None}})
                        break
                    lp = None
                    if body.logprobs is not None and new:
                        lp = completion_logprobs(seq, len(seq.token_ids) - len(new), len(seq.token_ids))
                    if delta or done or lp:
                        yield sse(chunk(i, delta, seq.finish_reason if done else None, lp))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk(0, ""), "choices": [], "usage": usage(seqs, body.n)})
                yield "data: [DONE]\n\n"
            return streaming(events(), slot, seqs)
        try:
            await collect(seqs, updates)
        finally:
            for s in seqs:
                s.cancelled = not s.finished
            slot.__exit__()
        choices = []
        for i, s in enumerate(seqs):
            lp = completion_logprobs(s, 0, len(s.token_ids)) if body.logprobs is not None else None
            choices.append({"index": i, "text": echo[i // body.n] + s.text, "logprobs": lp,
                            "finish_reason": s.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(seqs, body.n)}

    def completion_logprobs(seq: Sequence, a: int, b: int) -> dict:
        toks = [token_text(t) for t in seq.token_ids[a:b]]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        tops = seq.top_logprobs[a:b] if seq.top_logprobs is not None else [None] * (b - a)
        return {"tokens": toks, "token_logprobs": seq.logprobs[a:b], "text_offset": offsets,
                "top_logprobs": [None if t is None else top_by_text(t) for t in tops]}

    def top_by_text(top: dict[int, float]) -> dict[str, float]:
        """OpenAI keys top logprobs by token text; ids that decode alike (partial UTF-8) keep the likeliest."""
        out: dict[str, float] = {}
        for k, v in top.items():
            text = token_text(k)
            out[text] = max(v, out.get(text, float("-inf")))
        return out

    def chat_logprobs(seq: Sequence, a: int, b: int) -> dict:
        out = []
        tops = seq.top_logprobs[a:b] if seq.top_logprobs is not None else [{}] * (b - a)
        for t, lp, top in zip(seq.token_ids[a:b], seq.logprobs[a:b], tops):
            s = token_text(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": token_text(k), "logprob": v, "bytes": list(token_text(k).encode())}
                                         for k, v in top.items()]})
        return {"content": out}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
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
        ids = tokens_from(engine.chat_ids, messages)
        check_prompt(ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = [params_for(body, max_tokens, lp, k) for k in range(body.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        slot, seqs, updates = start([ids] * body.n, params)

        def chunk(i, delta, finish=None, logprobs=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        if body.stream:
            async def events():
                for i in range(len(seqs)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                left = len(seqs)
                while left:
                    i, delta, new, done = await updates.get()
                    left -= done
                    seq = seqs[i]
                    if seq.error is not None:
                        yield sse({"error": {"message": f"generation failed: {seq.error}", "type": "server_error",
                                             "param": None, "code": None}})
                        break
                    lp = chat_logprobs(seq, len(seq.token_ids) - len(new), len(seq.token_ids)) \
                        if body.logprobs and new else None
                    if delta or lp:
                        yield sse(chunk(i, {"content": delta}, None, lp))
                    if done:
                        yield sse(chunk(i, {}, seq.finish_reason))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk(0, {}), "choices": [], "usage": usage(seqs, body.n)})
                yield "data: [DONE]\n\n"
            return streaming(events(), slot, seqs)
        try:
            await collect(seqs, updates)
        finally:
            for s in seqs:
                s.cancelled = not s.finished
            slot.__exit__()
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                    "logprobs": chat_logprobs(s, 0, len(s.token_ids)) if body.logprobs else None,
                    "finish_reason": s.finish_reason} for i, s in enumerate(seqs)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(seqs, body.n)}

    @app.post("/infill")
    async def infill(body: InfillRequest):
        extra = "".join(str(c.get("text", "")) for c in body.input_extra if isinstance(c, dict))
        ids = tokens_from(engine.fim_ids, extra + body.input_prefix, body.input_suffix)
        if body.prompt:
            ids = ids + tokens_from(engine.tokenizer.encode, body.prompt)
        check_prompt(ids)
        max_tokens = limits.max_tokens if body.n_predict < 0 else body.n_predict
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"n_predict is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="n_predict")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, repetition_penalty=body.repeat_penalty,
                                    stop=tuple(s for s in body.stop if s), seed=body.seed, ignore_eos=body.ignore_eos,
                                    stream=body.stream)
        except DscoderError as e:
            raise APIError(400, str(e)) from None
        slot, seqs, updates = start([ids], [params])
        seq = seqs[0]

        def final():
            return {"content": seq.text if not body.stream else "", "stop": True, "model": model_name,
                    "tokens_predicted": len(seq.token_ids), "tokens_evaluated": len(ids),
                    "stop_type": "limit" if seq.finish_reason == "length" else "eos"}

        if body.stream:
            async def events():
                while True:
                    _, delta, _, done = await updates.get()
                    if delta:
                        yield sse({"content": delta, "stop": False})
                    if done:
                        yield sse(final())
                        return
            return streaming(events(), slot, seqs)
        try:
            await collect(seqs, updates)
        finally:
            seq.cancelled = not seq.finished
            slot.__exit__()
        return final()

    app.state.engine = engine
    app.state.limits = limits
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "dscoder",
          api_key: str | None = None, limits: Limits | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted: HTTP on a second thread, the engine's loop on this one (on CPU, model
    compute on the thread that loaded the model avoids a second OpenMP team; see :mod:`dscoder.engine.engine`)."""
    import uvicorn

    app = create_app(engine, model_name=model_name, api_key=api_key, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    stopped = threading.Event()

    def run_http():
        try:
            server.run()
        finally:
            stopped.set()

    http = threading.Thread(target=run_http, name="dscoder-http", daemon=True)
    http.start()
    try:
        engine.run_loop(stop=stopped)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    if not server.started:
        raise DscoderError(f"the server did not start on {host}:{port} (see the log above)")
