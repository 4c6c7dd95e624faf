"""`quantship bench --url`: the load benchmark over HTTP against an OpenAI-compatible server.

The same workload (news-text prompts as token ids, fixed or ranged lengths, seeded) and the same
`vllm bench serve` metrics (bench/metrics.py) as the in-process load bench, measured the way a
client sees them: each request is a streamed POST /v1/completions (temperature 0, `ignore_eos` so
every request produces its full length), arrival = just before the request is sent, one timestamp per
streamed chunk (the server sends one chunk per token). Requests that fail are counted in `failed`
(with the first errors), never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from ..specs import BenchSpec
from .metrics import RequestTiming, load_metrics


def _tokenizer_for(url: str, model: str | None, api_key: str | None):
    import httpx
    from transformers import AutoTokenizer

    from ..models.load import resolve_model

    served = None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    entry = r.json()["data"][0]
    served = entry["id"]
    source = model or entry.get("root") or served
    return AutoTokenizer.from_pretrained(resolve_model(source, log=lambda *a, **k: None)), served


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    arrival = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code}: {text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("the stream carried no token")
    return RequestTiming(arrival, tuple(times), len(prompt))


async def _drive(url: str, model: str, prompts, out_lens, spec: BenchSpec, api_key: str | None, arrivals):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(64, spec.concurrency or 0), max_keepalive_connections=64)
    done: list[RequestTiming] = []
    errors: list[str] = []
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def run(i: int) -> None:
            try:
                done.append(await _one(client, url, model, prompts[i], out_lens[i]))
            except Exception as e:  # noqa: BLE001 - every failure is counted and the first ones reported
                errors.append(f"{type(e).__name__}: {e}")

        start = time.perf_counter()
        if arrivals is None:
            pending = list(range(len(prompts)))

            async def worker():
                while pending:
                    await run(pending.pop(0))

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        else:
            tasks = []
            for i, at in enumerate(arrivals):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(run(i)))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return done, errors, duration


def run_http_bench(url: str, spec: BenchSpec, *, api_key: str | None = None, model: str | None = None) -> dict:
    """Load the server at `url` (closed loop at spec.concurrency or open loop at spec.request_rate) -> JSON dict:
    the load bench's metric keys plus url, served model, failed and errors."""
    from .run import make_workload
    from .workload import poisson_arrivals

    if spec.mode == "single":
        raise ValueError("--url needs a load mode: --concurrency N or --request-rate R")
    url = url.rstrip("/")
    tokenizer, served = _tokenizer_for(url, model, api_key)
    prompts, out_lens = make_workload(spec, tokenizer)
    arrivals = None
    if spec.mode == "request_rate":
        arrivals = ([0.0] * spec.num_prompts if math.isinf(spec.request_rate)
                    else poisson_arrivals(spec.num_prompts, spec.request_rate, spec.seed))
    if spec.warmup:
        asyncio.run(_drive(url, served, [prompts[0][:8]], [4], BenchSpec(model=spec.model, concurrency=1), api_key,
                           None))
    done, errors, duration = asyncio.run(_drive(url, served, prompts, out_lens, spec, api_key, arrivals))
    out = load_metrics(done, duration, spec.slos or None) if done else {"completed": 0, "duration_s": duration}
    out.update(mode=spec.mode, url=url, model=served, concurrency=spec.concurrency, request_rate=spec.request_rate,
               num_prompts=spec.num_prompts, input_len=spec.input_len, output_len=spec.output_len,
               failed=len(errors), errors=errors[:5])
    return out
