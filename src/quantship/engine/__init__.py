"""Inference engine: our own llama-family forward, preallocated KV cache, continuous batching."""

from .engine import Engine
from .params import SamplingParams, TokenEvent

__all__ = ["Engine", "SamplingParams", "TokenEvent"]
