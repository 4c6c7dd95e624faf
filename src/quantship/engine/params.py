"""Per-request sampling parameters and the token events the engine emits."""

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


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    text: str  # the newly decoded text of this token (stop strings excluded)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None
    time: float  # time.perf_counter() when produced
