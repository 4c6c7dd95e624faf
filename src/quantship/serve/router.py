"""Which model answers a request (canary share, sticky users), and the answer itself with fallback.

    choose()    candidate with probability canary% (sticky: a hash of the header value picks the side,
                so a user always lands on the same one); the baseline when the candidate is dead
    generate()  the chosen engine's token events; a candidate whose logits turn non-finite or whose
                engine dies mid-answer is cancelled and the baseline finishes the answer from the tokens
                already served (counted, logged); the client gets one good answer, never a 500
    shadow      after an answer, P% of requests are queued for the teacher-forced comparison (shadow.py)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from ..engine import EngineDeadError, SamplingParams

log = logging.getLogger("quantship.serve")


def sticky_share(value: str) -> float:
    """A stable number in [0, 100) for a user key: the same key always gets the same side."""
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


@dataclass
class Answer:
    """What the route reads while it streams: filled as events arrive."""

    role: str  # the side that started the answer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    token_times: list[float] = field(default_factory=list)
    nonfinite: int = 0
    fallback: str | None = None  # why the baseline finished a candidate answer


@dataclass(frozen=True)
class Event:
    token_id: int | None
    text: str
    finish_reason: str | None
    time: float


class Router:
    def __init__(self, baseline, candidate=None, *, rng: random.Random | None = None, metrics=None):
        self.baseline, self.candidate = baseline, candidate
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.canary = 0.0  # percent, set by the rollout
        self.shadow = 0.0

    def workers(self):
        return [w for w in (self.baseline, self.candidate) if w is not None]

    def choose(self, sticky_key: str | None) -> str:
        c = self.candidate
        if c is None or self.canary <= 0 or not c.ready or c.dead:
            return "baseline"
        draw = sticky_share(sticky_key) if sticky_key else self.rng.random() * 100
        return "candidate" if draw < self.canary else "baseline"

    def should_shadow(self) -> bool:
        c = self.candidate
        return c is not None and c.ready and not c.dead and self.shadow > 0 and self.rng.random() * 100 < self.shadow

    def worker(self, role: str):
        return self.candidate if role == "candidate" else self.baseline

    async def generate(self, prompt_ids: list[int], params: SamplingParams, answer: Answer,
                       request_id: str) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        role = answer.role
        reason = None
        if role == "candidate":
            worker = self.candidate
            try:
                stream = worker.engine.submit(prompt_ids, params, request_id, loop=loop)
            except EngineDeadError:
                stream, reason = None, "engine_dead"
            if stream is not None:
                worker.inflight += 1
                try:
                    async for ev in stream:
                        if ev.nonfinite_logits > answer.nonfinite:  # this token came from non-finite logits
                            answer.nonfinite = ev.nonfinite_logits
                            stream.cancel()
                            reason = "nonfinite"
                            break
                        out = self._take(answer, ev)
                        if out is not None:
                            yield out
                        if ev.finished:
                            return
                except EngineDeadError:
                    reason = "engine_dead"
                finally:
                    worker.inflight -= 1
            if reason is None:
                return
            self._fallback(answer, reason)
        remaining = params.max_tokens - len(answer.token_ids)
        if remaining <= 0:
            answer.finish_reason = "length"
            yield Event(None, "", "length", loop.time())
            return
        if answer.token_ids:
            params = replace(params, max_tokens=remaining)
        worker = self.baseline
        stream = worker.engine.submit(list(prompt_ids) + answer.token_ids, params,
                                      request_id + ("-fallback" if reason else ""), loop=loop)
        worker.inflight += 1
        try:
            async for ev in stream:
                out = self._take(answer, ev)
                if out is not None:
                    yield out
        finally:
            worker.inflight -= 1

    def _fallback(self, answer: Answer, reason: str) -> None:
        answer.fallback = reason
        c = self.candidate
        log.warning("fallback: candidate %s answer finished by the baseline (%s) after %d tokens",
                    c.name, reason, len(answer.token_ids))
        if self.metrics is not None:
            self.metrics.fallbacks.labels(c.name, "candidate", reason).inc()

    @staticmethod
    def _take(answer: Answer, ev) -> Event | None:
        if ev.token_id is not None:
            answer.token_ids.append(ev.token_id)
            answer.token_times.append(ev.time)
        answer.text += ev.text
        if ev.finished:
            answer.finish_reason = ev.finish_reason
        if ev.token_id is None and not ev.finished:
            return None
        return Event(ev.token_id, ev.text, ev.finish_reason if ev.finished else None, ev.time)
