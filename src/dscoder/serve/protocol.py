"""Request bodies of the OpenAI-compatible API (and llama.cpp's ``/infill``), validated by pydantic.

Unknown fields are ignored (clients send many). Types are strict: a count is a JSON integer (not ``"4"``, ``4.0`` or
``true``), a number is an integer or a float (not a string or a boolean), a flag is ``true``/``false``; a field of
the wrong type or out of range is a 400 error naming it (see :mod:`dscoder.serve.errors`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM uses -1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class InfillRequest(_Body):
    """llama.cpp server's ``/infill``: the middle between ``input_prefix`` and ``input_suffix``; ``prompt`` is the
    start of the middle (text after the cursor's line start); ``input_extra`` chunks of other files go first."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[dict] = []
    prompt: str = ""
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    stop: list[str] = []
    seed: int | None = Field(None)
    stream: bool = False
    ignore_eos: bool = False
