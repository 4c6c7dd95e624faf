"""Measure `quantship serve` on the default model: clients, rollout, shadow KLD vs eval, load, shadow overhead.

Each phase starts `quantship serve` as a subprocess on 127.0.0.1, drives it over HTTP and stops it:

    clients    openai (completion, chat, stream, logprobs) and lm-eval local-completions on the w8 artifact
    rollback   baseline fp32, candidate w2g64, shadow 100%, canary 10%: time and requests to the rollback
    norollback baseline fp32, candidate w8, same budget: 200 requests, no rollback
    kld        candidate w8, shadow 100%: requests of 64 prompt + 64 generated tokens; the served token
               sequences written out as text and scored by `quantship eval --ctx 128` (which scores the
               second half of each 128-token window: the generated tokens); live shadow KLD vs eval KLD
    load       32 concurrent streaming clients for 60 s (w8 alone): errors, tok/s, TTFT p95, TPOT p95
    overhead   fp32 baseline + w8 candidate, canary 100%: candidate TTFT p95 with shadow 0% vs 100%

    python benchmarks/serve_rollout.py --baseline smollm2-135m --w8 out/w8 --w2 out/w2g64 --phases all \
        --json docs/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BUDGET = {"shadow_kld_mean": 0.1, "top1_agreement": 0.8, "nonfinite_total": 0, "window_requests": 20,
          "failure_limit": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "quantship.cli", "serve", *args, "--port", str(self.port)]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() - t0 > 600:
                raise RuntimeError(f"server did not come up; see {log}")
            time.sleep(0.5)
        self.load_s = time.time() - t0

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text

    def rollout(self) -> dict:
        return httpx.get(self.url + "/admin/rollout", timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def news_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    import random

    from quantship.bench.workload import corpus_prompts, corpus_token_ids

    ids = corpus_token_ids(tokenizer, "news", min_tokens=max(8192, 4 * length))
    return corpus_prompts(ids, [length] * n, random.Random(0))


async def _post_all(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    out: list = [None] * len(bodies)
    pending = list(range(len(bodies)))
    async with httpx.AsyncClient(timeout=600) as c:
        async def worker():
            while pending:
                i = pending.pop(0)
                r = await c.post(url + "/v1/completions", json=bodies[i])
                out[i] = {"status": r.status_code, "body": r.json(), "time": time.time()}
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def phase_clients(args, work: Path) -> dict:
    import openai
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from quantship.models.load import load_model

    res = {}
    with Serve(args.w8, log=work / "clients.log") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        name = c.models.list().data[0].id
        r = c.completions.create(model=name, prompt="The capital of France is", max_tokens=12, temperature=0,
                                 logprobs=2)
        res["completion"] = {"text": r.choices[0].text, "usage": r.usage.model_dump(),
                             "first_logprobs": r.choices[0].logprobs.token_logprobs[:3]}
        msgs = [{"role": "user", "content": "Name three colors."}]
        r = c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0)
        res["chat"] = {"text": r.choices[0].message.content, "usage": r.usage.model_dump()}
        chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0, stream=True))
        res["chat_stream_equal"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            res["chat"]["text"]
        items = [("The quick brown fox jumps over the", " lazy dog"), ("Paris is the capital of", " France"),
                 ("def add(a, b):\n    return", " a + b"), ("Water boils at 100 degrees", " Celsius")]
        lm = LocalCompletionsAPI(base_url=s.url + "/v1/completions", model=name, tokenizer=str(s_path(args.w8)),
                                 tokenizer_backend="huggingface", max_retries=1)
        served = lm.loglikelihood([Instance("loglikelihood", {}, it, i) for i, it in enumerate(items)],
                                  disable_tqdm=True)
    import torch

    model, tok = load_model(args.w8, log=lambda *a, **k: None)
    diffs = []
    for (ctx, cont), (ll, _) in zip(items, served):
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        ref = sum(float(logp[p - 1, ids[p]]) for p in range(len(c_ids), len(ids)))
        diffs.append({"item": ctx + "|" + cont, "served": ll, "in_process": ref, "abs_diff": abs(ll - ref)})
    res["lm_eval_loglikelihood"] = diffs
    res["load_s"] = s.load_s
    return res


def s_path(name: str) -> Path:
    from quantship.models.load import resolve_model

    return resolve_model(name, log=lambda *a, **k: None)


def rollout_run(args, work: Path, candidate: str, n: int, tag: str, stop_on_rollback: bool) -> dict:
    from transformers import AutoTokenizer

    (work / "live.yaml").write_text("".join(f"{k}: {v}\n" for k, v in BUDGET.items()))
    tok = AutoTokenizer.from_pretrained(s_path(args.baseline))
    prompts = news_prompts(tok, n, 48)
    with Serve("--baseline", args.baseline, "--candidate", candidate, "--canary", "10", "--shadow", "100",
               "--budget", str(work / "live.yaml"), "--state-dir", str(work / f"state-{tag}"),
               log=work / f"{tag}.log") as s:
        t0 = time.time()
        sent = errors = 0
        rolled_at = None
        for start in range(0, n, 4):
            batch = [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in prompts[start:start + 4]]
            out = asyncio.run(_post_all(s.url, batch, 4))
            sent += len(out)
            errors += sum(o["status"] != 200 for o in out)
            snap = s.rollout()
            if snap["state"]["rolled_back"] and rolled_at is None:
                rolled_at = {"seconds": time.time() - t0, "client_requests_sent": sent, **snap["rollback"]}
                if stop_on_rollback:
                    break
        deadline = time.time() + 120  # let the shadow queue drain so the last windows close
        while s.rollout()["shadow_queue"]["pending"] and time.time() < deadline:
            time.sleep(0.5)
        snap = s.rollout()
        m = s.metrics()
    return {"candidate": candidate, "requests_sent": sent, "errors": errors, "rollback": rolled_at,
            "state": snap["state"], "totals": snap["totals"], "closed_windows": snap["closed_windows"][-3:],
            "shadow_queue": snap["shadow_queue"], "rollbacks_total": metric_value(m, "quantship_rollbacks_total"),
            "wall_s": time.time() - t0, "budget": BUDGET}


def phase_kld(args, work: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s_path(args.baseline))
    n, half = args.kld_requests, 64
    prompts = news_prompts(tok, n, half)
    with Serve("--baseline", args.baseline, "--candidate", args.w8, "--canary", "0", "--shadow", "100",
               "--shadow-queue", "1000", log=work / "kld.log") as s:
        bodies = [{"prompt": p, "max_tokens": half, "temperature": 0, "ignore_eos": True, "logprobs": 0}
                  for p in prompts]
        out = asyncio.run(_post_all(s.url, bodies, 4))
        deadline = time.time() + 300
        while s.rollout()["shadow_queue"]["pending"] and time.time() < deadline:
            time.sleep(0.5)
        m = s.metrics()
        snap = s.rollout()
    live_mean = metric_value(m, "quantship_shadow_kld_sum") / metric_value(m, "quantship_shadow_kld_count")
    # the served sequences (prompt ids + the generated tokens, re-encoded from their token strings)
    seqs, ok = [], 0
    for p, o in zip(prompts, out):
        gen_text = "".join(o["body"]["choices"][0]["logprobs"]["tokens"])
        full = tok.decode(p, clean_up_tokenization_spaces=False) + gen_text
        ids = tok(full, add_special_tokens=False)["input_ids"]
        ok += len(ids) == 2 * half
        seqs.append(full)
    text_file = work / "served.txt"
    text_file.write_text("".join(seqs))
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    report = work / "eval.json"
    subprocess.run([sys.executable, "-m", "quantship.cli", "eval", args.baseline, args.w8, "--text", str(text_file),
                    "--ctx", str(2 * half), "--max-windows", "0", "--json", str(report)], check=True,
                   stdout=open(work / "kld-eval.log", "w"), stderr=subprocess.STDOUT)
    data = json.loads(report.read_text())
    eval_kld = _find_kld(data)
    return {"requests": n, "tokens_per_request": 2 * half, "sequences_round_trip_exact": ok,
            "text_tokens": len(ids), "live_shadow_kld_mean": live_mean, "eval_kld_mean": eval_kld,
            "relative_diff": abs(live_mean - eval_kld) / eval_kld, "shadow_done": snap["shadow_queue"]}


def _find_kld(data) -> float:
    if isinstance(data, dict):
        if "kld" in data and isinstance(data["kld"], dict) and "mean" in data["kld"]:
            return data["kld"]["mean"]
        for v in data.values():
            try:
                return _find_kld(v)
            except KeyError:
                pass
    if isinstance(data, list):
        for v in data:
            try:
                return _find_kld(v)
            except KeyError:
                pass
    raise KeyError("kld")


def timed_load(url: str, prompts, seconds: float, clients: int, out_len: int) -> dict:
    from quantship.bench.http import _one
    from quantship.bench.metrics import load_metrics

    done, errors = [], []

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as c:
            start = time.perf_counter()
            counter = {"i": 0}

            async def client():
                while time.perf_counter() - start < seconds:
                    i = counter["i"] = counter["i"] + 1
                    try:
                        done.append(await _one(c, url, "x", prompts[i % len(prompts)], out_len))
                    except Exception as e:  # noqa: BLE001
                        errors.append(repr(e))
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - start

    duration = asyncio.run(main())
    out = load_metrics(done, duration)
    out.update(errors=len(errors), first_errors=errors[:3], clients=clients, seconds=seconds)
    return out


def phase_load(args, work: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s_path(args.w8))
    prompts = news_prompts(tok, 256, 64)
    with Serve(args.w8, "--max-batch", "32", "--served-model-name", "x", log=work / "load.log") as s:
        timed_load(s.url, prompts[:4], 5, 4, 4)  # warm-up
        return timed_load(s.url, prompts, args.load_seconds, 32, 32)


def phase_overhead(args, work: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s_path(args.w8))
    prompts = news_prompts(tok, 256, 64)
    res = {}
    with Serve("--baseline", args.baseline, "--candidate", args.w8, "--canary", "100", "--shadow", "0",
               "--served-model-name", "x", log=work / "overhead.log") as s:
        timed_load(s.url, prompts[:4], 5, 4, 4)
        for shadow in (0, 100, 0, 100):
            httpx.post(s.url + "/admin/rollout", json={"shadow": shadow}, timeout=30)
            r = timed_load(s.url, prompts, args.overhead_seconds, 8, 16)
            r["shadow_done"] = s.rollout()["shadow_queue"]
            res.setdefault(f"shadow_{shadow}", []).append({k: r[k] for k in ("completed", "errors", "ttft_s", "tpot_s",
                                                                            "output_tok_s", "shadow_done")})
    return res


def phase_combined(args, work: Path) -> dict:
    """norollback, kld, load and overhead on one server (fp32 baseline + w8 candidate): loading both models
    twice (engine + reference copy) takes minutes on a busy 2-core host, so they share one start."""
    from transformers import AutoTokenizer

    (work / "live.yaml").write_text("".join(f"{k}: {v}\n" for k, v in BUDGET.items()))
    tok = AutoTokenizer.from_pretrained(s_path(args.baseline))
    res = {}
    admin = lambda body: httpx.post(s.url + "/admin/rollout", json=body, timeout=30)  # noqa: E731

    def drain():
        deadline = time.time() + 600
        while s.rollout()["shadow_queue"]["pending"] and time.time() < deadline:
            time.sleep(0.5)

    with Serve("--baseline", args.baseline, "--candidate", args.w8, "--canary", "10", "--shadow", "100",
               "--budget", str(work / "live.yaml"), "--shadow-queue", "1000", "--max-batch", "32",
               "--served-model-name", "x", log=work / "combined.log") as s:
        res["load_s"] = s.load_s
        # 1. same budget as the w2g64 run: 200 requests, no rollback expected
        t0 = time.time()
        prompts = news_prompts(tok, 200, 48)
        out = asyncio.run(_post_all(s.url, [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in prompts], 4))
        drain()
        snap = s.rollout()
        res["norollback"] = {"requests_sent": len(out), "errors": sum(o["status"] != 200 for o in out),
                             "state": snap["state"], "totals": snap["totals"],
                             "closed_windows": snap["closed_windows"][-3:], "wall_s": time.time() - t0,
                             "budget": BUDGET, "shadow_queue": snap["shadow_queue"]}
        print("norollback", json.dumps(res["norollback"], default=str)[:1500], flush=True)
        # 2. live shadow KLD vs quantship eval on the served text
        admin({"canary": 0, "shadow": 100})
        m0 = s.metrics()
        n, half = args.kld_requests, 64
        kp = news_prompts(tok, n + 300, half)[300:]
        bodies = [{"prompt": p, "max_tokens": half, "temperature": 0, "ignore_eos": True, "logprobs": 0} for p in kp]
        kout = asyncio.run(_post_all(s.url, bodies, 4))
        drain()
        m1 = s.metrics()
        ksum = metric_value(m1, "quantship_shadow_kld_sum") - metric_value(m0, "quantship_shadow_kld_sum")
        kcnt = metric_value(m1, "quantship_shadow_kld_count") - metric_value(m0, "quantship_shadow_kld_count")
        res["kld"] = {"requests": n, "shadowed": kcnt, "live_shadow_kld_mean": ksum / kcnt, "outputs": [
            o["body"]["choices"][0]["logprobs"]["tokens"] for o in kout], "prompts": kp}
        # 3. load: 32 clients for 60 s, all answered by the candidate (w8), no shadow
        admin({"canary": 100, "shadow": 0})
        timed_load(s.url, kp[:4], 5, 4, 4)
        load_prompts = news_prompts(tok, 256, 64)
        res["load"] = timed_load(s.url, load_prompts, args.load_seconds, 32, 32)
        print("load", json.dumps(res["load"], default=str)[:1500], flush=True)
        # 4. shadow overhead on the candidate's TTFT (canary 100: the baseline is scored on candidate answers)
        for shadow in (0, 100, 0, 100):
            admin({"shadow": shadow})
            r = timed_load(s.url, load_prompts, args.overhead_seconds, 8, 16)
            r["shadow_queue"] = s.rollout()["shadow_queue"]
            res.setdefault("overhead", {}).setdefault(f"shadow_{shadow}", []).append(
                {k: r[k] for k in ("completed", "errors", "ttft_s", "tpot_s", "output_tok_s", "shadow_queue")})
            drain()
        print("overhead", json.dumps(res["overhead"], default=str)[:2500], flush=True)
    # the eval side of 2, after the server is gone
    seqs, exact = [], 0
    for p, toks in zip(res["kld"].pop("prompts"), res["kld"].pop("outputs")):
        full = tok.decode(p, clean_up_tokenization_spaces=False) + "".join(toks)
        exact += len(tok(full, add_special_tokens=False)["input_ids"]) == 2 * half
        seqs.append(full)
    text_file = work / "served.txt"
    text_file.write_text("".join(seqs))
    report = work / "eval.json"
    subprocess.run([sys.executable, "-m", "quantship.cli", "eval", args.baseline, args.w8, "--text", str(text_file),
                    "--ctx", str(2 * half), "--max-windows", "0", "--json", str(report)], check=True,
                   stdout=open(work / "kld-eval.log", "w"), stderr=subprocess.STDOUT)
    eval_kld = _find_kld(json.loads(report.read_text()))
    res["kld"].update(eval_kld_mean=eval_kld, sequences_round_trip_exact=exact,
                      text_tokens=len(tok(text_file.read_text(), add_special_tokens=False)["input_ids"]),
                      relative_diff=abs(res["kld"]["live_shadow_kld_mean"] - eval_kld) / eval_kld)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="smollm2-135m")
    ap.add_argument("--w8", required=True)
    ap.add_argument("--w2", required=True)
    ap.add_argument("--phases", default="all")
    ap.add_argument("--kld-requests", type=int, default=24)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--overhead-seconds", type=float, default=20)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    phases = ["clients", "rollback", "norollback", "kld", "load", "overhead"] if args.phases == "all" else \
        args.phases.split(",")
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for ph in phases:
        t0 = time.time()
        if ph == "clients":
            r = phase_clients(args, work)
        elif ph == "rollback":
            r = rollout_run(args, work, args.w2, 200, "w2", stop_on_rollback=True)
        elif ph == "norollback":
            r = rollout_run(args, work, args.w8, 200, "w8", stop_on_rollback=False)
        elif ph == "kld":
            r = phase_kld(args, work)
        elif ph == "load":
            r = phase_load(args, work)
        elif ph == "overhead":
            r = phase_overhead(args, work)
        elif ph == "combined":
            r = phase_combined(args, work)
        else:
            raise SystemExit(f"unknown phase {ph}")
        r["phase_wall_s"] = time.time() - t0
        out[ph] = r
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(ph, json.dumps(r, default=str)[:1500], flush=True)


if __name__ == "__main__":
    main()
