"""The playground at ``GET /`` and the facts it shows at ``GET /props``.

The page is one static file (``static/playground.html``: HTML, CSS and JS, no build step, nothing fetched from
elsewhere) with a chat pane (``/v1/chat/completions``), a FIM pane with prefix and suffix (``/v1/completions`` with
``suffix``), both streamed, a tokens/s readout and the model's facts (``/v1/models`` and ``/props``). It talks to
this server's routes only, which its Content-Security-Policy enforces. ``GET /`` needs no API key (a browser cannot
send one when it opens a page); the routes it calls do, so the page asks for the key when they answer 401.

``GET /props`` is dscoder's counterpart of llama.cpp server's ``/props``: the served model's name, its context and
architecture, parameter counts, dtype and device, the request caps, whether the tokenizer has FIM tokens, and the
warning FIM answers carry when the checkpoint is a chat/instruct one.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dscoder.serve import prompts
from dscoder.serve.state import state_of

router = APIRouter()

PAGE = "static/playground.html"
# inline script and style of this one file; fetches and everything else to this origin only
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def page_html() -> str:
    """The playground, read once from the package data."""
    return files("dscoder.serve").joinpath(PAGE).read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def playground():
    return HTMLResponse(page_html(), headers=PAGE_HEADERS)


@router.get("/props")
async def props(request: Request):
    state = state_of(request)
    engine = state.engine
    model, tok = engine.model, engine.tokenizer
    c = model.config
    weight = next(model.parameters())
    return {
        "model": state.model_name,
        "n_ctx": state.max_len,  # prompt + output per request (llama.cpp's name)
        "model_context": c.max_position_embeddings,
        "total_slots": engine.scheduler.max_batch,  # requests decoded together (llama.cpp's name)
        "max_tokens": state.limits.max_tokens,
        "max_concurrent": state.limits.max_concurrent,
        "fim": bool(tok is not None and tok.has_fim),
        "fim_warning": prompts.fim_warning(state),  # a chat/instruct checkpoint: infills are unreliable
        "architecture": {
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "attention_heads": c.num_attention_heads,
            "kv_lora_rank": c.kv_lora_rank, "routed_experts": c.n_routed_experts if c.is_moe else 0,
            "experts_per_token": c.num_experts_per_tok if c.is_moe else 0,
            "shared_experts": (c.n_shared_experts or 0) if c.is_moe else 0, "vocab_size": c.vocab_size,
        },
        "parameters": model.num_parameters(),
        "activated_parameters": model.num_activated_parameters(),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "device": str(weight.device),
    }
