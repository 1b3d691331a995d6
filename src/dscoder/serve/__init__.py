"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine.

``app`` assembles it; ``state`` holds what routes share; ``openai`` and ``llamacpp`` are the API families' routes;
``protocol`` the request bodies; ``prompts`` tokenizing off the event loop with size checks first; ``generation`` a
request's run on the engine (admission, updates, cancel on disconnect); ``middleware`` auth and the body cap;
``errors`` OpenAI-shaped errors; ``page`` the playground at ``/`` (``static/playground.html``) and ``/props``.
"""

__all__ = ["Limits", "create_app", "serve"]


def __getattr__(name: str):
    # imported on first use, so that `dscoder serve`'s parser (dscoder.serve.cli) does not load FastAPI for every
    # other command
    if name in ("create_app", "serve"):
        from dscoder.serve import app

        return getattr(app, name)
    if name == "Limits":
        from dscoder.serve.state import Limits

        return Limits
    raise AttributeError(f"module 'dscoder.serve' has no attribute {name!r}")
