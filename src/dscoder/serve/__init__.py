"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine.

``app`` assembles it; ``state`` holds what routes share; ``openai`` and ``llamacpp`` are the API families' routes;
``protocol`` the request bodies; ``prompts`` tokenizing off the event loop with size checks first; ``generation`` a
request's run on the engine (admission, updates, cancel on disconnect); ``middleware`` auth and the body cap;
``errors`` OpenAI-shaped errors.
"""

from dscoder.serve.app import create_app, serve
from dscoder.serve.state import Limits

__all__ = ["Limits", "create_app", "serve"]
