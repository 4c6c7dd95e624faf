"""Prometheus metrics of the server, named like vLLM's (`vllm:time_to_first_token_seconds` ->
`quantship_time_to_first_token_seconds`), labelled by `model` and `role` (baseline / candidate).

Each Server has its own CollectorRegistry (several servers in one process, as in tests, do not clash).
The README's "Serving" section documents every metric with a PromQL query.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("model", "role")
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_KLD = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_SHARE = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
_DRIFT = (-1.0, -0.5, -0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("quantship_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              LABELS, buckets=_LATENCY, registry=r)
        self.itl = Histogram("quantship_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             LABELS, buckets=_ITL, registry=r)
        self.e2e = Histogram("quantship_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             LABELS, buckets=_LATENCY, registry=r)
        self.running = Gauge("quantship_num_requests_running", "Requests in the engine's running batch.", LABELS,
                             registry=r)
        self.waiting = Gauge("quantship_num_requests_waiting", "Requests queued for a slot of the engine.", LABELS,
                             registry=r)
        self.prompt_tokens = Counter("quantship_prompt_tokens", "Prompt tokens processed.", LABELS, registry=r)
        self.generation_tokens = Counter("quantship_generation_tokens", "Tokens generated.", LABELS, registry=r)
        self.finished = Counter("quantship_request_success", "Finished requests by finish reason.",
                                (*LABELS, "finished_reason"), registry=r)
        self.requests = Counter("quantship_requests", "HTTP requests by route and status code.",
                                ("route", "status"), registry=r)
        self.nonfinite = Counter("quantship_nonfinite_logits", "Positions whose logits held a NaN or an infinity "
                                 "(source: served = sampled by the engine, shadow = teacher-forced scoring).",
                                 (*LABELS, "source"), registry=r)
        self.fallbacks = Counter("quantship_fallbacks", "Candidate answers finished by the baseline, by reason.",
                                 (*LABELS, "reason"), registry=r)
        self.shadow_kld = Histogram("quantship_shadow_kld", "Per shadowed request: mean KL(P_baseline || P_candidate) "
                                    "over the served tokens (nats).", LABELS, buckets=_KLD, registry=r)
        self.shadow_kld_max = Histogram("quantship_shadow_kld_max", "Per shadowed request: the largest per-token KLD.",
                                        LABELS, buckets=_KLD, registry=r)
        self.shadow_top1 = Histogram("quantship_shadow_top1_agreement", "Per shadowed request: share of served "
                                     "positions where both models' most likely token is the same.", LABELS,
                                     buckets=_SHARE, registry=r)
        self.shadow_drift = Histogram("quantship_shadow_likelihood_drift", "Per shadowed request: mean per-token "
                                      "log-likelihood of the served text, candidate minus baseline (nats).", LABELS,
                                      buckets=_DRIFT, registry=r)
        self.shadow_tokens = Counter("quantship_shadow_tokens", "Served tokens compared by the shadow.", LABELS,
                                     registry=r)
        self.shadow_requests = Counter("quantship_shadow_requests", "Shadow comparisons by outcome "
                                       "(done, dropped: queue full, failed).", (*LABELS, "outcome"), registry=r)
        self.canary_share = Gauge("quantship_canary_share", "Share of requests answered by the candidate (0..1).",
                                  ("model",), registry=r)
        self.rollbacks = Counter("quantship_rollbacks", "Rollbacks of the candidate (automatic or manual).",
                                 ("model", "trigger"), registry=r)
        self.budget_breaches = Counter("quantship_budget_window_breaches", "Closed live-budget windows that "
                                       "breached at least one term.", ("model",), registry=r)
        self.engine_up = Gauge("quantship_engine_up", "1 while the engine runs, 0 once it died.", LABELS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
