"""Request bodies of the OpenAI-compatible API (DeepSeek's ``/beta/completions`` is the same body) and of llama.cpp's
server (``/infill``, ``/completion``), validated by pydantic.

Unknown fields are ignored (clients send many). Types are strict: a count is a JSON integer (not ``"4"``, ``4.0`` or
``true``), a number is an integer or a float (not a string or a boolean), a flag is ``true``/``false``; a field of
the wrong type or out of range is a 400 error naming it (see :mod:`dscoder.serve.errors`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Stop lists of any practical length: Continue sends a dozen or more per language (DeepSeek's own API refused
# them); the caps only keep one request's stop-string checks bounded.
MAX_STOP_STRINGS = 1024
MAX_STOP_CHARS = 1000


def check_stop(stop):
    """A stop string or list within the caps (a ValueError names the cap, reported as a 400 on ``stop``)."""
    items = [stop] if isinstance(stop, str) else (stop or [])
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
    return stop


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
    _stop = field_validator("stop")(check_stop)
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


class _LlamaSampling(_Body):
    """What llama.cpp's server takes on ``/completion`` and ``/infill`` (its defaults). ``min_p``, ``samplers``,
    ``cache_prompt``, ``id_slot``, ``t_max_prompt_ms`` and ``penalty_last_n`` are accepted and not applied: sampling
    is temperature, top-k, top-p and ``repeat_penalty`` in the engine's fixed order, and the prompt cache is always
    on (the engine's prefix cache)."""

    model: str | None = None
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    penalty_last_n: int = Field(64, ge=-1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: list[str] = []
    _stop = field_validator("stop")(check_stop)
    seed: int | None = None  # -1 (llama.cpp) or absent: a random seed
    stream: bool = False
    ignore_eos: bool = False
    cache_prompt: bool = True
    id_slot: int = -1
    t_max_prompt_ms: int = -1
    t_max_predict_ms: int = -1
    n_indent: int = Field(0, ge=0)
    samplers: list[str] | str | None = None
    response_fields: list[str] | None = None


class InfillChunk(_Body):
    filename: str = ""
    text: str = ""


class InfillRequest(_LlamaSampling):
    """llama.cpp server's ``/infill``: the middle between ``input_prefix`` and ``input_suffix``; ``prompt`` is the typed
    part of the cursor's line (it ends the prefix); ``input_extra`` chunks of other files go first."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field([], max_length=4096)
    prompt: str = ""


class LlamaCompletionRequest(_LlamaSampling):
    """llama.cpp server's ``/completion``: a raw prompt (special-token strings are parsed, so a rendered FIM template
    works), text or token ids."""

    prompt: str | list[int]
