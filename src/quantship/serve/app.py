"""The OpenAI-compatible HTTP server (FastAPI): one model, or a baseline and a candidate under a rollout.

    POST /v1/completions        prompt (text, token ids, or a list of either), max_tokens, temperature,
                                top_p, top_k, seed, stop, n=1, logprobs, echo (prompt log-probabilities),
                                stream; vLLM's extras ignore_eos and repetition_penalty
    POST /v1/chat/completions   the tokenizer's chat template; stream (SSE ending in `data: [DONE]`),
                                logprobs / top_logprobs, usage
    GET  /v1/models, POST /tokenize, GET /metrics (Prometheus), GET /health (no key; 503 while loading or
    when the baseline engine is dead, "degraded" when only the candidate is)
    GET  /admin/rollout, POST /admin/rollout {"canary": 25, "shadow": 100}, POST /admin/rollback

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request, 401 missing
or wrong key (constant-time compare), 404 unknown model, 413 body too large, 429 + Retry-After when the
queue is full, 503 while loading. Requests queue to the engines' loop threads; a client that disconnects
cancels its request (its KV slot is freed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from ..engine import SamplingParams
from .metrics import ServeMetrics
from .router import Answer, Router

log = logging.getLogger("quantship.serve")
ROLE_HEADER = "x-quantship-served-by"  # which side answered (candidate+baseline: finished by the baseline)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
          "/admin/rollout", "/admin/rollback")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeConfig:
    baseline: str
    candidate: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None
    canary: float = 10.0  # percent (rollout mode)
    shadow: float = 0.0  # percent
    sticky_header: str | None = None
    budget: object = None  # a LiveBudget or None
    state_dir: str | None = None
    max_batch: int = 16
    max_seq_len: int | None = None
    max_queue: int = 256  # requests in flight (running + waiting) before 429
    shadow_queue: int = 64
    max_body_bytes: int = 1 << 20
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("canary", "shadow"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"--{name} is a percentage in [0, 100], got {getattr(self, name)}")
        if self.max_queue < 1 or self.max_batch < 1 or self.shadow_queue < 1:
            raise ValueError("max_queue, max_batch and shadow_queue must be >= 1")


def read_key_file(path: str | None) -> str | None:
    if path is None:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"key file {path} is empty")
    return key


class Server:
    """The workers, router, rollout, shadow runner and metrics behind one FastAPI app."""

    def __init__(self, config: ServeConfig):
        from .worker import Worker

        self.config = config
        self.metrics = ServeMetrics()
        kw = dict(max_batch=config.max_batch, max_seq_len=config.max_seq_len)
        self.baseline = Worker(config.baseline, "baseline", **kw)
        self.candidate = Worker(config.candidate, "candidate", **kw) if config.candidate else None
        self.router = Router(self.baseline, self.candidate, metrics=self.metrics)
        self.rollout = None
        self.shadow = None
        self.ready = False
        self.load_error: BaseException | None = None
        self.model_name = config.served_model_name or self.baseline.name
        self._inflight = 0

    # ----- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            for w in self.router.workers():
                t0 = time.perf_counter()
                w.load()
                log.info("loaded %s %s in %.1f s (decode path %s)", w.role, w.source, time.perf_counter() - t0,
                         w.engine.decode_path)
                self._watch(w)
            if self.candidate is not None:
                self._start_rollout()
            self.ready = True
        except BaseException as e:  # noqa: BLE001 - reported by /health and the CLI
            self.load_error = e
            log.error("loading failed: %s: %s", type(e).__name__, e)

    def load_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="quantship-load", daemon=True)
        t.start()
        return t

    def _watch(self, w) -> None:
        m = self.metrics
        m.running.labels(w.name, w.role).set_function(lambda: len(w.engine.running))
        m.waiting.labels(w.name, w.role).set_function(lambda: len(w.engine.waiting) + len(w.engine._box.inbox))
        m.engine_up.labels(w.name, w.role).set_function(lambda: 0.0 if w.dead else 1.0)

    def _start_rollout(self) -> None:
        from .rollout import Rollout, RolloutState, read_state
        from .shadow import ShadowRunner

        cfg, c = self.config, self.candidate
        state = read_state(cfg.state_dir)
        if state is not None:
            log.info("rollout state restored from %s: canary %.4g%%, shadow %.4g%%%s", cfg.state_dir, state.canary,
                     state.shadow, f", ROLLED BACK ({state.reason})" if state.rolled_back else "")
        else:
            state = RolloutState(canary=cfg.canary, shadow=cfg.shadow, updated=time.time())
        m = self.metrics
        self.rollout = Rollout(state, cfg.budget, cfg.state_dir, on_change=self._apply_state,
                               on_rollback=lambda trigger: m.rollbacks.labels(c.name, trigger).inc(),
                               on_breach=lambda: m.budget_breaches.labels(c.name).inc())
        self.shadow = ShadowRunner(self.baseline, c, self._on_shadow,
                                   lambda outcome: m.shadow_requests.labels(c.name, "candidate", outcome).inc(),
                                   maxsize=cfg.shadow_queue)

    def _apply_state(self, state) -> None:
        self.router.canary, self.router.shadow = state.canary, state.shadow
        self.metrics.canary_share.labels(self.candidate.name).set(state.canary / 100)

    def _on_shadow(self, r) -> None:
        m, name = self.metrics, self.candidate.name
        labels = (name, "candidate")
        m.shadow_requests.labels(*labels, "done").inc()
        m.shadow_kld.labels(*labels).observe(r.kld_mean)
        m.shadow_kld_max.labels(*labels).observe(r.kld_max)
        m.shadow_top1.labels(*labels).observe(r.top1_agreement)
        m.shadow_drift.labels(*labels).observe(r.drift)
        m.shadow_tokens.labels(*labels).inc(r.tokens)
        if r.nonfinite_candidate:
            m.nonfinite.labels(*labels, "shadow").inc(r.nonfinite_candidate)

    def shutdown(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
        for w in self.router.workers():
            w.shutdown()

    # ----- per request ----------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", "service_unavailable",
                           "load_failed")
        if not self.ready:
            raise APIError(503, "the model is loading; retry shortly", "service_unavailable", "loading",
                           headers={"Retry-After": "2"})
        if self.baseline.dead:
            raise APIError(503, f"the engine stopped: {self.baseline.engine.error}", "service_unavailable",
                           "engine_dead")

    def finish(self, answer: Answer, arrival: float, prompt_ids: list[int], error: bool = False) -> None:
        """Metrics, the rollout window and the shadow queue for one finished answer."""
        w = self.router.worker(answer.role)
        m, labels = self.metrics, (w.name, w.role)
        times = answer.token_times
        ttft = times[0] - arrival if times else None
        if times:
            m.ttft.labels(*labels).observe(ttft)
            m.e2e.labels(*labels).observe(times[-1] - arrival)
            for a, b in zip(times, times[1:]):
                m.itl.labels(*labels).observe(b - a)
        m.prompt_tokens.labels(*labels).inc(len(prompt_ids))
        m.generation_tokens.labels(*labels).inc(len(answer.token_ids))
        if answer.finish_reason:
            m.finished.labels(*labels, answer.finish_reason).inc()
        if answer.nonfinite:
            m.nonfinite.labels(*labels, "served").inc(answer.nonfinite)
        if self.rollout is None:
            return
        self.rollout.record_nonfinite(answer.role, answer.nonfinite)
        failed = error or answer.fallback is not None
        record = lambda shadow=None: self.rollout.record_request(  # noqa: E731
            answer.role, ttft=ttft, error=failed, shadow=shadow)
        if not self._shadow(answer, prompt_ids, record):
            record()

    def _shadow(self, answer: Answer, prompt_ids: list[int], on_done) -> bool:
        """Queue the teacher-forced comparison of this answer (off the client's path) -> whether queued."""
        from .shadow import ShadowJob

        if (self.shadow is None or answer.fallback is not None or not answer.token_ids
                or answer.finish_reason in (None, "cancelled") or not self.router.should_shadow()):
            return False
        self.shadow.submit(ShadowJob(list(prompt_ids), list(answer.token_ids), answer.role, on_done))
        return True

    def health(self) -> tuple[int, dict]:
        def side(w):
            if w.engine is None:
                return "loading"
            return "dead" if w.dead else "ok"

        body = {"model": self.model_name, "baseline": side(self.baseline)}
        if self.candidate is not None:
            body["candidate"] = side(self.candidate)
        if self.load_error is not None:
            return 503, {**body, "status": "failed", "error": str(self.load_error)}
        if not self.ready:
            return 503, {**body, "status": "loading"}
        if self.baseline.dead:
            return 503, {**body, "status": "dead"}
        if self.candidate is not None and self.candidate.dead:
            return 200, {**body, "status": "degraded"}
        return 200, {**body, "status": "ok"}


# ----- request parsing -----------------------------------------------------------------------------
def _num(body: dict, name: str, default, kind=float, lo=None, hi=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                       param=name, code="invalid_type")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise APIError(400, f"'{name}' must be {bound}, got {value!r}", param=name, code="invalid_value")
    return kind(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", param=name, code="invalid_type")
    return value


def sampling_params(body: dict, max_tokens: int) -> SamplingParams:
    if _num(body, "n", 1, int) != 1 or _num(body, "best_of", 1, int) != 1:
        raise APIError(400, "only n = 1 (and best_of = 1) is supported", param="n", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, 0.0) != 0.0:
            raise APIError(400, f"'{name}' is not supported (use repetition_penalty)", param=name,
                           code="invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if any(not s for s in stop):
        raise APIError(400, "'stop' strings must be non-empty", param="stop", code="invalid_value")
    top_k = _num(body, "top_k", 0, int, lo=-1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed", code="invalid_type")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0, lo=0.0, hi=2.0),  # OpenAI's default: 1
        top_p=_num(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=max(top_k, 0),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, lo=0.0, lo_open=True),
        stop=stop, seed=seed, ignore_eos=_bool(body, "ignore_eos"))


async def read_json(request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body has {size} bytes, more than the limit of {limit}",
                       code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _token_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_prompts(body: dict, server: Server) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of either", param="prompt",
                       code="invalid_type")
    vocab = server.baseline.engine.model.config.vocab_size
    out = []
    for p in prompts:
        ids = server.baseline.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if any(t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        out.append(ids)
    return out


def check_length(server: Server, prompt_len: int, max_tokens: int) -> None:
    limit = server.baseline.max_seq_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"this model's context is {limit} tokens; the request needs {prompt_len} prompt + "
                            f"{max_tokens} new tokens = {prompt_len + max_tokens}: shorten the prompt or lower "
                            f"max_tokens", param="max_tokens", code="context_length_exceeded")


# ----- log-probabilities ------------------------------------------------------------------------------
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def score_tokens(worker, ids: list[int], first: int, top: int) -> tuple[list[float | None], list]:
    """Teacher-forced log-probabilities of ids[first:] (None for position 0) and the `top` alternatives."""
    import torch

    logp = torch.log_softmax(worker.logits(ids), -1)  # (T, V): row t predicts ids[t + 1]
    token_lp: list[float | None] = []
    tops: list = []
    for pos in range(first, len(ids)):
        if pos == 0:
            token_lp.append(None)
            tops.append(None)
            continue
        row = logp[pos - 1]
        token_lp.append(float(row[ids[pos]]))
        if top:
            values, indices = row.topk(top)
            tops.append([(int(i), float(v)) for v, i in zip(values.tolist(), indices.tolist())])
        else:
            tops.append([])
    return token_lp, tops


def completion_logprobs(worker, ids: list[int], first: int, top: int) -> dict:
    token_lp, tops = score_tokens(worker, ids, first, top)
    tok = worker.tokenizer
    tokens = [_token_text(tok, t) for t in ids[first:]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top_dicts = [None if t is None else {_token_text(tok, i): v for i, v in t} for t in tops]
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(worker, ids: list[int], first: int, top: int) -> dict:
    token_lp, tops = score_tokens(worker, ids, first, top)
    tok = worker.tokenizer
    content = []
    for t, lp, alts in zip(ids[first:], token_lp, tops):
        text = _token_text(tok, t)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (s := _token_text(tok, i)), "logprob": v, "bytes": list(s.encode())}
                                         for i, v in alts or []]})
    return {"content": content}


# ----- the app ------------------------------------------------------------------------------------
def create_app(server: Server):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = server.config
    app = FastAPI(title="quantship", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return JSONResponse({"error": {"message": str(e.detail), "type": kind, "param": None, "code": None}},
                            status_code=e.status_code)

    def auth(request: Request, admin: bool = False, allow_admin: bool = False) -> None:
        expected = cfg.admin_key if admin and cfg.admin_key else cfg.api_key
        keys = [k for k in (expected, cfg.admin_key if allow_admin else None) if k]
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        ok = False
        for k in keys:  # every key is compared (constant time each), whatever matched first
            ok |= hmac.compare_digest(given.encode(), k.encode())
        if not given or not ok:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'"
                           + (" (the admin key)" if admin else ""), "authentication_error", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: dict) -> None:
        name = body.get("model")
        names = {server.model_name, server.baseline.name} | ({server.candidate.name} if server.candidate else set())
        if name is not None and name not in names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {server.model_name!r}",
                           "invalid_request_error", "model_not_found", "model")

    def admit(n: int = 1) -> None:
        if server._inflight + n > cfg.max_queue:
            raise APIError(429, f"the server has {server._inflight} requests in flight (limit {cfg.max_queue}); "
                           f"retry later", "rate_limit_exceeded", "queue_full", headers={"Retry-After": "1"})

    async def run_answer(request: Request, prompt_ids, params, rid, on_event=None) -> Answer:
        """Generate one answer to the end (cancelled if the client disconnects)."""
        sticky = request.headers.get(cfg.sticky_header) if cfg.sticky_header else None
        answer = Answer(server.router.choose(sticky))
        arrival = time.perf_counter()
        server._inflight += 1
        error = False
        try:
            async for ev in server.router.generate(prompt_ids, params, answer, rid):
                if on_event is not None:
                    await on_event(ev)
        except asyncio.CancelledError:  # the client left: the stream's exit cancelled the engine request
            answer.finish_reason = answer.finish_reason or "cancelled"
            raise
        except BaseException:
            error = True
            raise
        finally:
            server._inflight -= 1
            server.finish(answer, arrival, prompt_ids, error=error and answer.finish_reason != "cancelled")
        return answer

    async def until_done_or_disconnect(request: Request, coro):
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    raise APIError(499, "the client disconnected", code="client_closed_request")
        finally:
            if not task.done():
                task.cancel()

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # ----- routes -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request):
        auth(request)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        server.check_ready()
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "quantship", "root": server.baseline.source,
                                            "max_model_len": server.baseline.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        auth(request)
        server.check_ready()
        body = await read_json(request, cfg.max_body_bytes)
        if "messages" in body:
            ids = chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            ids = server.baseline.encode(body["prompt"])
        else:
            raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt", code="invalid_type")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.baseline.max_seq_len}

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        server.check_ready()
        body = await read_json(request, cfg.max_body_bytes)
        check_model(body)
        prompts = parse_prompts(body, server)
        echo, stream = _bool(body, "echo"), _bool(body, "stream")
        max_tokens = _num(body, "max_tokens", 16, int, lo=0 if echo and not stream else 1)
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = _num(body, "logprobs", None, int, lo=0, hi=20)
        params = sampling_params(body, max(max_tokens, 1))
        for ids in prompts:
            check_length(server, len(ids), max_tokens)
        if stream and len(prompts) > 1:
            raise APIError(400, "stream takes one prompt", param="prompt", code="invalid_value")
        if stream and (logprobs is not None or echo):
            raise APIError(400, "logprobs and echo are not supported with stream", param="stream",
                           code="invalid_value")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        admit(len(prompts))
        if stream:
            return StreamingResponse(stream_completion(request, prompts[0], params, rid, created, body),
                                     media_type="text/event-stream")

        async def one(ids, index):
            if max_tokens == 0:
                answer = Answer("baseline", finish_reason="length")
            else:
                answer = await run_answer(request, ids, params, f"{rid}-{index}")
            choice = {"index": index, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
            if echo:
                choice["text"] = server.baseline.tokenizer.decode(ids, clean_up_tokenization_spaces=False) + answer.text
            if logprobs is not None:
                full = ids + answer.token_ids
                worker = server.router.worker(answer.role if not answer.fallback else "baseline")
                choice["logprobs"] = await asyncio.to_thread(completion_logprobs, worker, full,
                                                             0 if echo else len(ids), logprobs)
            return choice, len(ids), len(answer.token_ids), answer.role + ("+baseline" if answer.fallback else "")

        results = await until_done_or_disconnect(
            request, asyncio.gather(*(one(ids, i) for i, ids in enumerate(prompts))))
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                             "choices": [r[0] for r in results],
                             "usage": usage(sum(r[1] for r in results), sum(r[2] for r in results))},
                            headers={ROLE_HEADER: ",".join(r[3] for r in results)})

    async def stream_completion(request, ids, params, rid, created, body):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        queue: asyncio.Queue = asyncio.Queue()

        async def on_event(ev):
            await queue.put(ev)

        task = asyncio.ensure_future(run_answer(request, ids, params, rid, on_event))
        task.add_done_callback(lambda t: queue.put_nowait(None))
        try:
            while True:
                ev = await queue.get()
                if ev is None:
                    break
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                        "finish_reason": ev.finish_reason}]})
            answer = task.result()
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [], "usage": usage(len(ids), len(answer.token_ids))})
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    def chat_prompt(body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_type")
        for m in messages:
            if isinstance(m.get("content"), list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"]):
                    raise APIError(400, "only text content parts are supported", param="messages",
                                   code="invalid_value")
                m["content"] = "".join(p.get("text", "") for p in m["content"])
            if not isinstance(m.get("content"), str):
                raise APIError(400, "every message needs 'content' as a string", param="messages",
                               code="invalid_type")
        tok = server.baseline.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages is the client's error
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages",
                           code="invalid_value") from None
        return server.baseline.encode(text)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        auth(request)
        server.check_ready()
        body = await read_json(request, cfg.max_body_bytes)
        check_model(body)
        ids = chat_prompt(body)
        stream = _bool(body, "stream")
        limit = server.baseline.max_seq_len
        default = max(1, min(512, limit - len(ids)))
        max_tokens = _num(body, "max_completion_tokens", None, int, lo=1)
        max_tokens = max_tokens or _num(body, "max_tokens", default, int, lo=1)
        want_lp = _bool(body, "logprobs")
        top = _num(body, "top_logprobs", 0, int, lo=0, hi=20)
        if stream and want_lp:
            raise APIError(400, "logprobs are not supported with stream", param="stream", code="invalid_value")
        params = sampling_params(body, max_tokens)
        check_length(server, len(ids), max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        admit()
        if stream:
            return StreamingResponse(stream_chat(request, ids, params, rid, created, body),
                                     media_type="text/event-stream")
        answer = await until_done_or_disconnect(request, run_answer(request, ids, params, rid))
        lp = None
        if want_lp:
            worker = server.router.worker(answer.role if not answer.fallback else "baseline")
            lp = await asyncio.to_thread(chat_logprobs, worker, ids + answer.token_ids, len(ids), top)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                          "logprobs": lp, "finish_reason": answer.finish_reason}],
                             "usage": usage(len(ids), len(answer.token_ids))},
                            headers={ROLE_HEADER: answer.role + ("+baseline" if answer.fallback else "")})

    async def stream_chat(request, ids, params, rid, created, body):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
        queue: asyncio.Queue = asyncio.Queue()

        async def on_event(ev):
            await queue.put(ev)

        task = asyncio.ensure_future(run_answer(request, ids, params, rid, on_event))
        task.add_done_callback(lambda t: queue.put_nowait(None))
        try:
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
            while True:
                ev = await queue.get()
                if ev is None:
                    break
                delta = {"content": ev.text} if ev.text or ev.token_id is not None else {}
                yield sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": ev.finish_reason}]})
            answer = task.result()
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(ids), len(answer.token_ids))})
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    # ----- rollout administration -----------------------------------------------------------------------
    def rollout_or_404():
        server.check_ready()
        if server.rollout is None:
            raise APIError(404, "this server has no candidate: start it with --baseline B --candidate C",
                           "not_found", "no_rollout")
        return server.rollout

    @app.get("/admin/rollout")
    async def get_rollout(request: Request):
        auth(request, allow_admin=True)
        r = rollout_or_404()
        snap = r.snapshot()
        snap.update(baseline=server.baseline.source, candidate=server.candidate.source,
                    candidate_dead=server.candidate.dead,
                    shadow_queue={"pending": server.shadow.pending(), "done": server.shadow.done,
                                  "dropped": server.shadow.dropped, "failed": server.shadow.failed})
        return snap

    @app.post("/admin/rollout")
    async def set_rollout(request: Request):
        auth(request, admin=True)
        r = rollout_or_404()
        body = await read_json(request, cfg.max_body_bytes)
        unknown = sorted(set(body) - {"canary", "shadow"})
        if unknown or not body:
            raise APIError(400, f"give 'canary' and/or 'shadow' (percentages){'; unknown: ' + ', '.join(unknown) if unknown else ''}",
                           code="invalid_value")
        canary = _num(body, "canary", None, float, lo=0, hi=100)
        shadow = _num(body, "shadow", None, float, lo=0, hi=100)
        return r.set_shares(canary=canary, shadow=shadow).to_json()

    @app.post("/admin/rollback")
    async def rollback(request: Request):
        auth(request, admin=True)
        r = rollout_or_404()
        body = await read_json(request, cfg.max_body_bytes) if request.headers.get("content-length", "0") != "0" else {}
        reason = body.get("reason") or "manual rollback"
        return r.rollback(str(reason), None, "manual").to_json()

    return app


class _StatusCounter:
    """ASGI middleware: count responses by route and status code (quantship_requests_total)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 499}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()


def build_asgi(server: Server):
    return _StatusCounter(create_app(server), server.metrics)


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    """Run the server until interrupted (the CLI's `quantship serve`)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(config)
    server.load_in_background()
    try:
        uvicorn.run(build_asgi(server), host=config.host, port=config.port, log_level=log_level,
                    timeout_graceful_shutdown=5)
    finally:
        server.shutdown()
