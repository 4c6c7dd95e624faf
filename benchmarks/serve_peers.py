"""llama.cpp's OpenAI server (`python -m llama_cpp.server`, llama-cpp-python) under the same load as
`quantship serve`: N concurrent streaming clients for T seconds on loopback, news-text prompts, the same
metrics (bench/metrics.py: output tok/s, TTFT p95, TPOT p95).

    python benchmarks/serve_peers.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --clients 32 --seconds 60 \
        [--quantship-url http://127.0.0.1:8000] --json peers.json

llama.cpp's server takes text prompts (they are the decoded news windows) and has no `ignore_eos`, so
a request may end early at an end-of-text token; counts are per streamed chunk, as for quantship.
With --quantship-url, the running quantship server is measured right after, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client, url: str, prompt, max_tokens: int):
    from quantship.bench.metrics import RequestTiming

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
    arrival = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line[6:] != "[DONE]" and json.loads(line[6:]).get("choices"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no token streamed")
    return RequestTiming(arrival, tuple(times), 0)


def timed_load(url: str, prompts: list, clients: int, seconds: float, max_tokens: int) -> dict:
    from quantship.bench.metrics import load_metrics

    done, errors = [], []

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as c:
            start = time.perf_counter()
            counter = [0]

            async def client():
                while time.perf_counter() - start < seconds:
                    counter[0] += 1
                    try:
                        done.append(await _one(c, url, prompts[counter[0] % len(prompts)], max_tokens))
                    except Exception as e:  # noqa: BLE001 - counted
                        errors.append(repr(e))
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - start

    duration = asyncio.run(main())
    out = load_metrics(done, duration) if done else {"completed": 0}
    out.update(errors=len(errors), first_errors=errors[:3], clients=clients, seconds=seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokenizer cuts the news prompts")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantship-url")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import random

    from transformers import AutoTokenizer

    from quantship.bench.workload import corpus_prompts, corpus_token_ids
    from quantship.models.load import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer, log=lambda *a, **k: None))
    ids = corpus_token_ids(tok, "news", min_tokens=8192)
    prompts = corpus_prompts(ids, [args.input_len] * 256, random.Random(0))
    texts = [tok.decode(p) for p in prompts]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(args.json).with_suffix(".llama_cpp.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.threads)],
                            stdout=log, stderr=subprocess.STDOUT)
    result = {"gguf": args.gguf, "clients": args.clients, "seconds": args.seconds}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("llama_cpp.server did not start")
            time.sleep(0.5)
        timed_load(url, texts[:2], 2, 3, 4)  # warm-up
        result["llama_cpp"] = timed_load(url, texts, args.clients, args.seconds, args.output_len)
    finally:
        proc.terminate()
        proc.wait(30)
    if args.quantship_url:
        timed_load(args.quantship_url, prompts[:2], 2, 3, 4)
        result["quantship"] = timed_load(args.quantship_url, prompts, args.clients, args.seconds, args.output_len)
        q, p = result["quantship"], result["llama_cpp"]
        result["ratio_output_tok_s"] = q["output_tok_s"] / p["output_tok_s"]
        result["ratio_ttft_p95"] = q["ttft_s"]["p95"] / p["ttft_s"]["p95"]
        result["ratio_tpot_p95"] = q["tpot_s"]["p95"] / p["tpot_s"]["p95"]
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items()}, default=str)[:3000])


if __name__ == "__main__":
    main()
