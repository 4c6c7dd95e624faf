"""Load generation against an Engine, in-process: closed loop (fixed concurrency) or open loop (arrivals).

The driver owns the engine's bare core (no loop thread between it and `step()`) and interleaves:
admit every request whose arrival time has come, run one step, record each token's timestamp.
Time inside the prefill and decode forwards comes from the engine's step hook. A request that
"arrives" while a step runs is admitted after it; its TTFT still counts from its scheduled
arrival, as a real server's clients would see it.

    closed loop   `concurrency` requests in flight; each finish is replaced at once (its
                  arrival = the moment it was added)
    open loop     request i arrives at start + arrivals[i], however busy the engine is
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .metrics import RequestTiming


@dataclass
class StepTimes:
    """Time spent inside the engine's prefill and decode forwards (filled from its step hook)."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def __call__(self, step) -> None:
        """The step hook: accumulate one forward (an engine StepInfo)."""
        if step.kind == "prefill":
            self.prefill_s += step.duration_s
            self.prefill_tokens += step.tokens
        else:
            self.decode_s += step.duration_s
            self.decode_steps += 1
            self.decode_tokens += step.tokens
            self.batch_sizes.append(step.batch_size)


def run_load(engine, prompts: list[list[int]], output_lens: list[int], *, concurrency: int | None = None,
             arrivals: list[float] | None = None, on_finish=None) -> tuple[list[RequestTiming], float, StepTimes]:
    """Send every prompt; -> (per-request timings, wall duration, time inside prefill/decode).

    Exactly one of `concurrency` (closed loop) or `arrivals` (open loop, offsets in seconds) is given.
    `on_finish()` is called once per completed request (progress bars)."""
    from ..engine import SamplingParams

    if (concurrency is None) == (arrivals is None):
        raise ValueError("give exactly one of concurrency (closed loop) or arrivals (open loop)")
    if len(prompts) != len(output_lens) or (arrivals is not None and len(arrivals) != len(prompts)):
        raise ValueError("prompts, output_lens (and arrivals) must have the same length")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if engine.has_unfinished():
        raise RuntimeError("the engine already has requests; benchmark an idle engine")
    pending = list(range(len(prompts)))
    arrival: dict[str, float] = {}
    index: dict[str, int] = {}
    tokens: dict[str, list[float]] = {}
    done: list[RequestTiming] = []

    def admit(i: int, at: float) -> None:
        params = SamplingParams(max_tokens=output_lens[i], ignore_eos=True)  # every request runs its full length
        rid = engine.add_request(prompts[i], params, request_id=f"bench-{i}")
        arrival[rid], index[rid], tokens[rid] = at, i, []

    stats = StepTimes()
    with engine.step_hook(stats):
        start = time.perf_counter()
        while pending or engine.has_unfinished():
            now = time.perf_counter()
            if concurrency is not None:
                while pending and len(tokens) < concurrency:
                    admit(pending.pop(0), time.perf_counter())
            else:
                while pending and start + arrivals[pending[0]] <= now:
                    i = pending.pop(0)
                    admit(i, start + arrivals[i])
                if not engine.has_unfinished():  # idle until the next arrival
                    time.sleep(max(0.0, start + arrivals[pending[0]] - time.perf_counter()))
                    continue
            for ev in engine.step():
                tokens[ev.request_id].append(ev.time)
                if ev.finished:
                    rid = ev.request_id
                    done.append(RequestTiming(arrival.pop(rid), tuple(tokens.pop(rid)), len(prompts[index.pop(rid)])))
                    if on_finish:
                        on_finish()
        duration = time.perf_counter() - start
    return done, duration, stats
