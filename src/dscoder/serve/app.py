"""An OpenAI-compatible HTTP server over :class:`~dscoder.engine.Engine` (FastAPI + uvicorn).

Routes: ``GET /health``; OpenAI's ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``,
and DeepSeek's ``POST /beta/completions`` (:mod:`dscoder.serve.openai`); llama.cpp's ``POST /infill`` and
``POST /completion`` (:mod:`dscoder.serve.llamacpp`); the playground page ``GET /`` and the model's facts
``GET /props`` (:mod:`dscoder.serve.page`). Another API family
is one more module with a ``router``, included here. Every error is ``{"error": {"message", "type", "param",
"code"}}`` (:mod:`dscoder.serve.errors`) with a 4xx status for the client's mistakes: bad JSON or fields (400), a
missing or wrong bearer token (401), a body over the size cap (413), a prompt longer than the context or
``max_tokens`` above the cap (400), too many requests in flight (429).
"""

from __future__ import annotations

import threading

from fastapi import FastAPI

from dscoder.engine import Engine
from dscoder.errors import DscoderError
from dscoder.serve import errors, llamacpp, ollama, openai, page
from dscoder.serve.middleware import BearerAuth, BodyLimit
from dscoder.serve.state import Limits, ServerState

ROUTERS = (openai.router, llamacpp.router, ollama.router, page.router)


def create_app(engine: Engine, *, model_name: str = "dscoder", api_key: str | None = None,
               limits: Limits | None = None, checkpoint: str | None = None) -> FastAPI:
    """The FastAPI app; its routes read ``app.state.serve`` (a :class:`ServerState`), and ``limits`` is read per
    request, so changing it takes effect at once. ``checkpoint``: the checkpoint's directory, whose name tells a
    chat/instruct checkpoint from a Base one (FIM answers from the former carry a warning)."""
    state = ServerState(engine, model_name, limits or Limits())
    state.checkpoint = checkpoint
    app = FastAPI(title="dscoder", docs_url=None, redoc_url=None)
    app.state.serve = state
    app.state.engine, app.state.limits = engine, state.limits
    errors.install(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=state.body_limit, explain=state.explain_body_limit)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)  # added last: runs first, before the body is read
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "dscoder",
          api_key: str | None = None, limits: Limits | None = None, log_level: str = "info",
          checkpoint: str | None = None) -> None:
    """Run the server until interrupted: HTTP on a second thread, the engine's loop on this one (on CPU, model
    compute on the thread that loaded the model avoids a second OpenMP team; see :mod:`dscoder.engine.engine`)."""
    import uvicorn

    app = create_app(engine, model_name=model_name, api_key=api_key, limits=limits, checkpoint=checkpoint)
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
