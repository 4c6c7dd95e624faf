"""Per-request sampling parameters, the token events the engine emits, a finished request's output,
and what a step hook receives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text, not included in the output
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos
    seed: int | None = None  # per-request generator (sampling only)
    ignore_eos: bool = False  # benchmarks: always produce max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None only on the event that ends a cancelled request (it carries no token)
    text: str  # the text this token completes (held back while a UTF-8 character is incomplete; stop strings excluded)
    finished: bool
    finish_reason: str | None  # one of FINISH_REASONS on the last event, else None
    time: float  # time.perf_counter() when produced
    nonfinite_logits: int = 0  # the request's count so far of positions whose logits held a NaN or an infinity


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: what a stream's `result()` returns."""

    request_id: str
    prompt_tokens: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # one of FINISH_REASONS
    nonfinite_logits: int  # positions whose logits held a NaN or an infinity (0 for a healthy model)


@dataclass(frozen=True)
class StepInfo:
    """What a step hook (`Engine.add_step_hook`) receives after each forward of the engine.

    kind         "prefill" (one request's prompt) or "decode" (one token for every running request)
    batch_size   requests in the forward: 1 for a prefill, the running requests for a decode
    tokens       tokens the forward processed: the prompt's length for a prefill, batch_size for a decode
    duration_s   wall time of the forward alone (sampling and detokenization excluded)
    start        time.perf_counter() when the forward started
    """

    kind: str
    batch_size: int
    tokens: int
    duration_s: float
    start: float
