"""Inference engine: our own llama-family forward, preallocated KV cache, continuous batching, one owner thread."""

from .engine import Engine
from .loop import EngineDeadError, RequestStream
from .params import RequestOutput, SamplingParams, StepInfo, TokenEvent

__all__ = ["Engine", "EngineDeadError", "RequestOutput", "RequestStream", "SamplingParams", "StepInfo", "TokenEvent"]
