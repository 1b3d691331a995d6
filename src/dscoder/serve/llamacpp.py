"""llama.cpp server's routes, as llama.vim, llama.vscode, Continue's and Tabby's llama.cpp providers call them.

``POST /infill``: the middle between ``input_prefix`` and ``input_suffix``, with ``input_extra`` chunks of other files
first and ``prompt`` (the typed part of the cursor's line) ending the prefix, built by
:func:`dscoder.serve.prompts.fim_request_ids` with llama.cpp's budgets (truncation reported in ``truncated``).
``POST /completion``: a raw prompt. Both answer llama.cpp's fields (``content``, ``stop``, ``tokens_cached``,
``truncated``, ``timings`` ...), filtered by ``response_fields`` (slash paths such as ``timings/prompt_n`` become keys
of a flat object, as llama.cpp does); ``stream`` sends ``data: {"content", "stop": false}`` events and a last one with
``stop: true`` and the final fields. ``n_predict: 0`` is a cache warm-up: the prompt is prefilled, nothing generated.
``t_max_predict_ms`` ends generation once that time has passed and a newline has been generated; ``n_indent`` ends it
before the first line (after the first newline) indented less than that many spaces/tabs (blank lines do not count).
``model`` is ignored, as llama.cpp's server ignores it (llama.vscode sends its own configured name).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dscoder.engine import SamplingParams, Sequence
from dscoder.errors import DscoderError
from dscoder.serve import prompts
from dscoder.serve.errors import APIError
from dscoder.serve.generation import Generation, sse, sse_error
from dscoder.serve.protocol import InfillRequest, LlamaCompletionRequest
from dscoder.serve.state import ServerState, state_of

router = APIRouter()

WARNING_HEADER = "X-Dscoder-Warning"


def llama_params(state: ServerState, body: InfillRequest | LlamaCompletionRequest) -> SamplingParams:
    """The engine's sampling parameters for a llama.cpp body; a value it refuses is a 400 naming it."""
    max_tokens = state.check_max_tokens(None if body.n_predict < 0 else body.n_predict, "n_predict")
    seed = None if body.seed is None or body.seed < 0 else body.seed & 0x7FFFFFFF
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              repetition_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, stop=tuple(s for s in body.stop if s),
                              seed=seed, ignore_eos=body.ignore_eos, stream=body.stream)
    except DscoderError as e:
        raise APIError(400, str(e), param=str(e).split(":")[0]) from None


class Watch:
    """Follows one sequence's text: ends it early for ``t_max_predict_ms`` and ``n_indent`` (cancelling it in the
    engine), keeps the text the client gets, and the times llama.cpp's ``timings`` report."""

    def __init__(self, body: InfillRequest | LlamaCompletionRequest):
        self.t_max = body.t_max_predict_ms / 1000 if body.t_max_predict_ms > 0 else None
        self.n_indent = body.n_indent
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.scan = 0  # lines starting before this index have been checked against n_indent
        self.stopped = False  # ended here (not by the engine)
        self.t_start = time.monotonic()
        self.t_first: float | None = None
        self.t_end: float | None = None

    def __call__(self, i: int, seq: Sequence, delta: str, new: list[int], done: bool) -> str:
        """Take one update; return the text that can be streamed now."""
        now = time.monotonic()
        if new and self.t_first is None:
            self.t_first = now
        if done:
            self.t_end = now
        if self.stopped:
            return ""
        self.text += delta
        safe = len(self.text)
        if self.n_indent:
            safe = self._check_indent(seq)
        if (not self.stopped and self.t_max is not None and self.t_first is not None and "\n" in self.text
                and now - self.t_first > self.t_max):
            self._stop(seq)
        if self.stopped or done:
            safe = len(self.text)
        out, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return out

    def _check_indent(self, seq: Sequence) -> int:
        """Check each line begun after a newline; return how much text is decided (an undecided line, so far only
        indentation, is held back)."""
        while True:
            nl = self.text.find("\n", self.scan)
            if nl < 0:
                return len(self.text)
            start = nl + 1
            rest = self.text[start:]
            body = rest.lstrip(" \t")
            if not body:
                return start  # only indentation so far: not decided
            if not body.startswith("\n") and len(rest) - len(body) < self.n_indent:
                self.text = self.text[:start]
                self._stop(seq)
                return start
            self.scan = start

    def _stop(self, seq: Sequence) -> None:
        self.stopped = True
        seq.cancelled = True  # the scheduler frees the row at its next step

    def content(self, seq: Sequence) -> str:
        return self.text if self.stopped else seq.text

    def timings(self, seq: Sequence) -> dict:
        end = self.t_end or time.monotonic()
        first = self.t_first or end
        prompt_n = len(seq.prompt_ids) - cached_tokens(seq)
        predicted_n = len(seq.token_ids)
        prompt_ms, predicted_ms = (first - self.t_start) * 1000, (end - first) * 1000
        return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0}


def cached_tokens(seq: Sequence) -> int:
    """Prompt tokens the engine took from its prefix cache (0 where the engine does not report it)."""
    return int(getattr(seq, "cached_tokens", 0) or 0)


def stop_type(state: ServerState, seq: Sequence, watch: Watch) -> str:
    if watch.stopped or seq.finish_reason == "length":
        return "limit"
    if seq.finish_reason == "stop":
        return "eos" if seq.token_ids and seq.token_ids[-1] in seq.stop_ids else "word"
    return "none"


def pick_fields(out: dict, fields: list[str] | None) -> dict:
    """llama.cpp's ``response_fields``: only the paths asked for, a slash path (``timings/prompt_n``) as one flat key;
    paths that name nothing are left out (so ``[""]``, a warm-up's, answers ``{}``)."""
    if not fields:
        return out
    picked = {}
    for path in fields:
        node, found = out, bool(path)
        for part in path.split("/") if path else ():
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                found = False
                break
        if found:
            picked[path] = node
    return picked


async def run(state: ServerState, request: Request, body: InfillRequest | LlamaCompletionRequest, ids: list[int],
              params: SamplingParams, truncated: bool, warning: str | None):
    """Generate for one llama.cpp request and answer in its shape (streamed or not)."""
    watch = Watch(body)
    gen = Generation(state, [ids], [params])
    seq = gen.seqs[0]
    headers = {WARNING_HEADER: warning} if warning else {}

    def final(content: str) -> dict:
        out = {"index": 0, "content": content, "tokens": [], "id_slot": max(body.id_slot, 0), "stop": True,
               "model": state.model_name, "tokens_predicted": len(seq.token_ids), "tokens_evaluated": len(ids),
               "generation_settings": {"n_predict": body.n_predict, "temperature": body.temperature,
                                       "top_k": body.top_k, "top_p": body.top_p, "seed": params.seed,
                                       "stop": list(params.stop), "n_indent": body.n_indent,
                                       "t_max_predict_ms": body.t_max_predict_ms},
               "has_new_line": "\n" in content, "truncated": truncated,
               "stop_type": stop_type(state, seq, watch), "stopping_word": "",
               "tokens_cached": cached_tokens(seq), "timings": watch.timings(seq)}
        if warning:
            out["warning"] = warning
        return out

    if body.stream:
        async def events():
            async for update in gen.updates():
                if seq.error is not None:
                    yield sse_error(seq)
                    return
                delta = watch(*update)
                if delta:
                    yield sse({"index": 0, "content": delta, "stop": False, "id_slot": max(body.id_slot, 0)})
                if update[-1]:
                    yield sse(final(""))
        response = gen.stream(events())
        response.headers.update(headers)
        return response
    try:
        await gen.wait(request, watch=watch)
    finally:
        gen.close()
    return JSONResponse(pick_fields(final(watch.content(seq)), body.response_fields), headers=headers)


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    state = state_of(request)
    params = llama_params(state, body)
    fim = await prompts.fim_request_ids(state, body.input_prefix, body.input_suffix,
                                        extra=[(c.filename, c.text) for c in body.input_extra], typed=body.prompt,
                                        n_predict=body.n_predict, truncate=True)
    return await run(state, request, body, fim.ids, params, fim.truncated, fim.warning)


@router.post("/completion")
async def completion(body: LlamaCompletionRequest, request: Request):
    state = state_of(request)
    params = llama_params(state, body)
    if isinstance(body.prompt, list) and not body.prompt:
        raise APIError(400, "prompt: expected a string or a non-empty list of token ids", param="prompt")
    ids = await prompts.prompt_ids(state, body.prompt, special=True)
    tok = state.engine.tokenizer
    fim = tok is not None and tok.has_fim and tok.fim_begin_id in ids
    return await run(state, request, body, ids, params, False, prompts.fim_warning(state) if fim else None)
