"""Ollama's API, so clients written for Ollama (Continue's Ollama provider, Open WebUI, ``ollama``'s own libraries)
work unchanged: ``POST /api/generate``, ``POST /api/chat``, ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps`` and
``GET /api/version``.

As Ollama does: ``stream`` defaults to true and streams NDJSON (one JSON object a line, the last one ``done: true``
with the counts and durations in nanoseconds); every error is ``{"error": "..."}`` with a 4xx status for the
client's mistakes (404 for another model's name). Sampling comes from ``options`` with Ollama's defaults
(temperature 0.8, top_k 40, top_p 0.9), except ``repeat_penalty``: 1.0 unless asked (this engine's penalty covers the
whole sequence, not Ollama's last 64 tokens).

``/api/generate`` builds its prompt so:
- ``suffix`` given: fill-in-the-middle through the shared FIM builder (``prompt`` is the prefix), as Ollama renders
  an insert-capable template; also with ``raw`` (Ollama would drop the suffix there: we do not drop what was sent);
- ``raw``: ``prompt`` as it is, special-token strings parsed (a client that writes its own template, e.g. Continue's
  DeepSeek FIM template when FIM is off), bos first;
- ``template``: Ollama's ``{{ .System }}`` / ``{{ .Prompt }}`` / ``{{ .Suffix }}`` / ``{{ .Response }}`` variables
  substituted (no ``if``/``range``: those are a 400), then as ``raw``;
- otherwise the model's template, which is what ``/api/show`` reports: a chat/instruct checkpoint renders
  ``system`` + ``prompt`` as one user turn of the DeepSeek chat template; a base checkpoint's template is the prompt
  itself (``{{ .Prompt }}``, as Ollama's base models have), so the text is completed as it is and ``system`` has no
  place in it.

``/api/show``'s ``template`` carries ``{{ .Suffix }}`` for a base (FIM-trained) checkpoint: that is how Continue
decides it can send FIM. ``keep_alive`` is accepted and does nothing (the model stays loaded while the server runs).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from dscoder.engine import SamplingParams
from dscoder.errors import DscoderError
from dscoder.serve import prompts
from dscoder.serve.errors import APIError, validation_message
from dscoder.serve.generation import Generation
from dscoder.serve.state import ServerState, state_of

NDJSON = "application/x-ndjson"


# ----- errors in Ollama's shape -------------------------------------------------------------------------------------
def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


class OllamaRoute(APIRoute):
    """A route whose errors (bad JSON or fields, :class:`APIError`) are Ollama's ``{"error": "..."}`` instead of the
    server's OpenAI shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return ollama_error(400, validation_message(list(e.errors()))[0])
            except APIError as e:
                return ollama_error(e.status, e.message)
            except DscoderError as e:  # the request's own input (e.g. text that is not Unicode)
                return ollama_error(400, str(e))
            except Exception as e:  # noqa: BLE001 - a server fault, still in the shape Ollama's clients read
                return ollama_error(500, f"internal error: {type(e).__name__}: {e}")
        return route


router = APIRouter(route_class=OllamaRoute)


# ----- request bodies -----------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# Options Ollama samples with and this engine does not: refused unless they ask for no effect.
UNSUPPORTED_OPTIONS = {"min_p": 0.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}


class Options(_Body):
    """Ollama's runtime ``options`` (Modelfile parameters). Load-time ones (``num_ctx``, ``num_gpu``, ``num_thread``,
    ``use_mmap``, ...) are accepted and ignored: the server's context and devices are fixed when it starts."""

    num_predict: int | None = None  # -1 (Ollama: no limit) and -2 (fill the context): the server's cap
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(40, ge=-1)  # <= 0: off
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = None  # negative: a random seed (Ollama's -1)
    stop: str | list[str] | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


KeepAlive = int | float | str | None


class _Request(_Body):
    model: str = ""
    stream: bool | None = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    format: str | dict | None = None
    think: bool | str | None = None


class GenerateRequest(_Request):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class Message(_Body):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list | None = None


class ChatRequest(_Request):
    messages: list[Message] = []
    tools: list | None = None


class ShowRequest(_Body):
    model: str = ""
    name: str = ""  # what older clients (Continue) send
    verbose: bool = False


# ----- checks -------------------------------------------------------------------------------------------------------
_DURATION = re.compile(r"^-?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+$|^-?\d+(\.\d*)?$")


def check_model(state: ServerState, name: str) -> None:
    """The name ``/api/tags`` reports (``<name>:latest`` too when it has no tag, Ollama's default tag); else 404."""
    if not name:
        raise APIError(400, "model is required")
    served = state.model_name
    if name != served and not (":" not in served and name == f"{served}:latest"):
        raise APIError(404, f"model '{name}' not found (this server serves '{served}')")


def check_common(body: _Request) -> None:
    if isinstance(body.keep_alive, str) and body.keep_alive.strip() and not _DURATION.match(body.keep_alive.strip()):
        raise APIError(400, f"keep_alive: '{body.keep_alive}' is not a duration (e.g. 30, \"5m\", \"-1\")")
    if body.format not in (None, ""):
        raise APIError(400, "format (JSON mode / structured outputs) is not supported by this server")
    if body.think not in (None, False, ""):
        raise APIError(400, f"'{body.model}' does not support thinking")


def sampling_params(state: ServerState, options: Options | None) -> SamplingParams:
    o = options or Options()
    for name, neutral in UNSUPPORTED_OPTIONS.items():
        value = getattr(o, name)
        if value is not None and value != neutral:
            raise APIError(400, f"options.{name}: not supported by this server (send {neutral} or leave it out)")
    max_tokens = state.check_max_tokens(None if o.num_predict is None or o.num_predict < 0 else o.num_predict,
                                        "options.num_predict")
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    seed = None if o.seed is None or o.seed < 0 else o.seed & 0x7FFFFFFF
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=o.temperature, top_p=o.top_p, top_k=max(o.top_k, 0),
                              repetition_penalty=o.repeat_penalty, presence_penalty=o.presence_penalty,
                              frequency_penalty=o.frequency_penalty, seed=seed, stop=tuple(s for s in stop if s))
    except DscoderError as e:
        raise APIError(400, f"options.{e}") from None


def is_instruct(state: ServerState) -> bool:
    """Whether the checkpoint looks like a chat/instruct one (FIM was trained only on Base checkpoints)."""
    return prompts.fim_warning(state) is not None


# ----- prompts ------------------------------------------------------------------------------------------------------
async def raw_ids(state: ServerState, text: str) -> list[int]:
    """``text`` as a raw prompt: special-token strings are the tokens (Ollama's raw mode), bos first."""
    return await prompts.prompt_ids(state, text, special=True)


_TEMPLATE_VAR = re.compile(r"\{\{\s*\.(System|Prompt|Suffix|Response)\s*\}\}")


def render_template(template: str, values: dict[str, str]) -> str:
    """Ollama's Go template with plain variables only (``{{ .Prompt }}``, ``{{- .System -}}``); anything else is a
    400 naming what is supported."""
    template = re.sub(r"-\}\}\s*", "}}", re.sub(r"\s*\{\{-", "{{", template))  # {{- and -}} trim whitespace
    if "{{" in _TEMPLATE_VAR.sub("", template):
        raise APIError(400, "template: only {{ .System }}, {{ .Prompt }}, {{ .Suffix }} and {{ .Response }} are "
                            "supported (no if, range or functions)")
    return _TEMPLATE_VAR.sub(lambda m: values.get(m.group(1), ""), template)


async def generate_ids(state: ServerState, body: GenerateRequest, max_tokens: int) -> tuple[list[int], str | None]:
    """The prompt of ``/api/generate`` (see the module's doc) and a warning for the response, if any."""
    if body.raw and (body.template or body.system or body.context):
        raise APIError(400, "raw mode does not support template, system, or context")
    if body.context:
        raise APIError(400, "context (deprecated in Ollama) is not supported: send the conversation to /api/chat")
    if body.images:
        raise APIError(400, "images are not supported by this model")
    if body.template:
        return await raw_ids(state, render_template(body.template, {"System": body.system, "Prompt": body.prompt,
                                                                    "Suffix": body.suffix})), None
    if body.suffix:
        fim = await prompts.fim_request_ids(state, body.prompt, body.suffix, n_predict=max_tokens)
        return fim.ids, fim.warning
    if body.raw:
        ids = await raw_ids(state, body.prompt)
        tok = state.engine.tokenizer
        fim = tok is not None and tok.has_fim and tok.fim_begin_id in ids  # a FIM prompt the client wrote itself
        return ids, prompts.fim_warning(state) if fim else None
    if is_instruct(state):
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
        return await prompts.chat_ids(state, messages), None
    return await prompts.prompt_ids(state, body.prompt), None


def chat_messages(body: ChatRequest) -> list[dict]:
    if body.tools:
        raise APIError(400, f"'{body.model}' does not support tools")
    out = []
    for k, m in enumerate(body.messages):
        if m.role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages.{k}.role: expected system, user or assistant (got '{m.role}')")
        if m.images:
            raise APIError(400, f"messages.{k}.images: images are not supported by this model")
        if m.tool_calls:
            raise APIError(400, f"messages.{k}.tool_calls: tools are not supported by this model")
        out.append({"role": m.role, "content": m.content})
    return out


# ----- answers ------------------------------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def final_stats(gen: Generation, arrived: float) -> dict:
    """The counts and durations (ns) of the last object; the prompt's time runs from submission to the first token."""
    seq = gen.seqs[0]
    end = gen.finished_at or time.monotonic()
    first = gen.first_token_at or end
    return {"done_reason": "length" if seq.finish_reason == "length" else "stop",
            "total_duration": _ns(time.monotonic() - arrived), "load_duration": 0,
            "prompt_eval_count": len(seq.prompt_ids), "prompt_eval_duration": _ns(first - gen.started_at),
            "eval_count": len(seq.token_ids), "eval_duration": _ns(end - first)}


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def run(state: ServerState, request: Request, ids: list[int], params: SamplingParams, stream: bool,
              chunk, arrived: float, extra: dict):
    """Generate and answer: NDJSON lines ``chunk(delta) + done: false``, then ``chunk("") + done: true`` and the
    stats; or one object with the whole text. ``extra`` goes into the last object (a FIM warning)."""
    gen = Generation(state, [ids], [params])
    if stream:
        async def lines():
            async for _, seq, delta, _, done in gen.updates():
                if seq.error is not None:
                    yield _line({"error": f"generation failed: {seq.error}"})
                    return
                if delta:
                    yield _line({**chunk(delta), "done": False})
                if done:
                    yield _line({**chunk(""), "done": True, **final_stats(gen, arrived), **extra})
        return gen.stream(lines(), media_type=NDJSON)
    try:
        await gen.wait(request)
    finally:
        gen.close()
    return {**chunk(gen.seqs[0].text), "done": True, **final_stats(gen, arrived), **extra}


def _loaded(body: _Request, **fields) -> dict:
    """Ollama's answer to a request with nothing to generate: the model is (already) loaded, or 'unloaded' when
    ``keep_alive`` is 0 (this server keeps it loaded either way)."""
    unload = body.keep_alive in (0, "0", "0s", "0m")
    return {"model": body.model, "created_at": now_iso(), **fields, "done": True,
            "done_reason": "unload" if unload else "load"}


# ----- routes -------------------------------------------------------------------------------------------------------
@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    arrived = time.monotonic()
    state = state_of(request)
    check_model(state, body.model)
    check_common(body)
    params = sampling_params(state, body.options)
    if not body.prompt and not body.suffix:
        return _loaded(body, response="")
    ids, warning = await generate_ids(state, body, params.max_tokens)
    return await run(state, request, ids, params, body.stream is not False,
                     lambda text: {"model": body.model, "created_at": now_iso(), "response": text}, arrived,
                     {"warning": warning} if warning else {})


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    arrived = time.monotonic()
    state = state_of(request)
    check_model(state, body.model)
    check_common(body)
    params = sampling_params(state, body.options)
    messages = chat_messages(body)
    if not messages:
        return _loaded(body, message={"role": "assistant", "content": ""})
    ids = await prompts.chat_ids(state, messages)
    return await run(state, request, ids, params, body.stream is not False,
                     lambda text: {"model": body.model, "created_at": now_iso(),
                                   "message": {"role": "assistant", "content": text}}, arrived, {})


# ----- the model's facts --------------------------------------------------------------------------------------------
BASE_TEMPLATE = ("{{ if .Suffix }}<｜fim▁begin｜>{{ .Prompt }}<｜fim▁hole｜>{{ .Suffix }}<｜fim▁end｜>"
                 "{{ else }}{{ .Prompt }}{{ end }}")
CHAT_TEMPLATE = ("{{ if .System }}{{ .System }}\n\n{{ end }}{{ if .Prompt }}User: {{ .Prompt }}\n\n{{ end }}"
                 "Assistant:{{ .Response }}")


def _size_label(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def facts(request: Request) -> dict[str, Any]:
    """What /api/tags, /api/show and /api/ps say about the served model (computed once per app)."""
    cached = getattr(request.app.state, "ollama_facts", None)
    if cached is not None:
        return cached
    state = state_of(request)
    model = state.engine.model
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
    config = model.config
    config_json = json.dumps(config.to_dict() if hasattr(config, "to_dict") else vars(config), sort_keys=True,
                             default=str)
    details = {"parent_model": "", "format": "safetensors", "family": "deepseek2", "families": ["deepseek2"],
               "parameter_size": _size_label(count),
               "quantization_level": {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, dtype.upper())}
    cached = {
        "name": state.model_name, "model": state.model_name, "modified_at": now_iso(), "size": size,
        "digest": hashlib.sha256(f"{state.model_name}\n{config_json}".encode()).hexdigest(), "details": details,
        "parameter_count": count, "on_gpu": params[0].device.type != "cpu" if params else False,
        "model_info": {"general.architecture": "deepseek2", "general.parameter_count": count,
                       "deepseek2.context_length": state.max_len,
                       "deepseek2.embedding_length": config.hidden_size,
                       "deepseek2.block_count": config.num_hidden_layers,
                       "deepseek2.attention.head_count": config.num_attention_heads,
                       "deepseek2.attention.kv_lora_rank": config.kv_lora_rank,
                       "deepseek2.expert_count": config.n_routed_experts or 0,
                       "deepseek2.expert_used_count": config.num_experts_per_tok or 0,
                       "deepseek2.vocab_size": config.vocab_size},
    }
    request.app.state.ollama_facts = cached
    return cached


def _entry(f: dict) -> dict:
    return {k: f[k] for k in ("name", "model", "modified_at", "size", "digest", "details")}


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [_entry(facts(request))]}


@router.get("/api/ps")
async def ps(request: Request):
    f = facts(request)
    return {"models": [{**_entry(f), "expires_at": "9999-12-31T23:59:59Z",
                        "size_vram": f["size"] if f["on_gpu"] else 0}]}


@router.get("/api/version")
async def version():
    from dscoder import __version__
    return {"version": __version__}


@router.post("/api/show")
async def show(body: ShowRequest, request: Request):
    state = state_of(request)
    check_model(state, body.model or body.name)
    f = facts(request)
    instruct = is_instruct(state)
    template = CHAT_TEMPLATE if instruct else BASE_TEMPLATE
    # one "key value" a line: Continue reads num_ctx from here (and breaks on a line of another form)
    parameters = f"num_ctx {state.max_len}"
    modelfile = (f"# Served by dscoder\nFROM {state.model_name}\nTEMPLATE \"\"\"{template}\"\"\"\n"
                 f"PARAMETER num_ctx {state.max_len}\n")
    return {"license": "", "modelfile": modelfile, "parameters": parameters, "template": template, "system": "",
            "details": f["details"], "model_info": f["model_info"], "modified_at": f["modified_at"],
            "capabilities": ["completion"] if instruct else ["completion", "insert"]}


OLLAMA_ROUTES = {"/api/generate": "POST", "/api/chat": "POST", "/api/show": "POST", "/api/tags": "GET",
                 "/api/ps": "GET", "/api/version": "GET"}


@router.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_served(request: Request):
    """Ollama's other routes (pull, create, embed, ...) and wrong methods, answered in Ollama's error shape."""
    path = request.url.path
    if path in OLLAMA_ROUTES:
        raise APIError(405, f"{request.method} {path}: use {OLLAMA_ROUTES[path]}")
    raise APIError(404, f"{path} is not served here (this server answers {', '.join(OLLAMA_ROUTES)})")
