"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine."""

from dscoder.serve.app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
