"""Inference: latent-cache generation with continuous batching, sampling, FIM and chat prompts."""

from dscoder.engine.batch import Completion, Scheduler, Sequence
from dscoder.engine.engine import Engine, StreamChunk
from dscoder.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "Scheduler", "Sequence", "StreamChunk"]
