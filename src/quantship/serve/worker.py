"""One served model: its Engine (running its loop thread) and a reference copy for teacher-forced scoring.

The engine takes ownership of its model (fast kernels, repacked weights), so log-probabilities
(`logprobs`, `echo`) and shadow comparisons run on a second, untouched copy loaded the same way
`quantship eval` loads it: the numbers the shadow reports are the offline evaluation's numbers.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch


class Worker:
    def __init__(self, source: str, role: str, *, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache: str = "float32"):
        self.source, self.role = str(source), role
        self.name = Path(str(source).rstrip("/")).name or str(source)
        self.max_batch, self.max_seq_len_request, self.kv_cache = max_batch, max_seq_len, kv_cache
        self.engine = None
        self.reference = None
        self.tokenizer = None
        self.path: Path | None = None
        self._ref_lock = threading.Lock()
        self.inflight = 0  # requests this server handed to the engine and not finished (event-loop thread only)

    def load(self) -> Worker:
        from ..engine import Engine
        from ..models.load import load_model, resolve_model

        quiet = lambda *a, **k: None  # noqa: E731
        self.path = resolve_model(self.source, log=quiet)
        model, tokenizer = load_model(self.path, log=quiet)
        self.engine = Engine(model, tokenizer, max_batch=self.max_batch, max_seq_len=self.max_seq_len_request,
                             kv_cache=self.kv_cache).start()
        self.reference, _ = load_model(self.path, log=quiet)
        self.tokenizer = tokenizer
        return self

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def dead(self) -> bool:
        return self.engine is not None and self.engine.dead

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def encode(self, text: str) -> list[int]:
        with self.engine._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits (T, V) of the reference copy at every position of `ids`."""
        with self._ref_lock:
            out = self.reference(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
        return out[0].float()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(timeout=5)
