"""The OpenAI-compatible server against real clients over 127.0.0.1 (tiny random models).

openai (completion, chat, streaming, logprobs, error shapes), lm-eval local-completions, raw HTTP
for auth / size / malformed bodies, a bounded load test, disconnects, and `quantship bench --url`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import LiveServer, with_chat_template  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory):
    return with_chat_template(tiny_models["llama"], tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def live(chat_model):
    with LiveServer({"baseline": str(chat_model), "api_key": KEY, "max_batch": 8}) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def _engine_greedy(path, prompt: str, n: int) -> list[int]:
    from quantship.engine import Engine, SamplingParams
    from quantship.models.load import load_model

    model, tok = load_model(path, log=lambda *a, **k: None)
    return Engine(model, tok, max_batch=2).generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]


def test_completion_greedy_matches_in_process_engine_token_by_token(live, client, chat_model):
    from transformers import AutoTokenizer

    prompt = "The quick brown fox"
    r = client.completions.create(model=live.server.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                  logprobs=0, extra_body={"ignore_eos": True})
    expected = _engine_greedy(chat_model, prompt, 12)
    tok = AutoTokenizer.from_pretrained(chat_model)
    served = r.choices[0].logprobs.tokens
    assert served == [tok.decode([t], clean_up_tokenization_spaces=False) for t in expected]
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    # token ids as the prompt give the same answer
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    r2 = client.completions.create(model=live.server.model_name, prompt=ids, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text


def test_logprobs_and_echo_are_the_reference_log_probabilities(live, client, chat_model):
    from quantship.models.load import load_model

    r = client.completions.create(model=live.server.model_name, prompt="Quantization maps real", max_tokens=1,
                                  temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and r.choices[0].text.startswith("Quantization maps real")
    model, tok = load_model(chat_model, log=lambda *a, **k: None)
    ids = tok("Quantization maps real", add_special_tokens=False)["input_ids"]
    assert len(lp.tokens) == len(ids) + 1
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert len(lp.top_logprobs[pos]) <= 3 and max(lp.top_logprobs[pos].values()) == pytest.approx(
            float(ref[pos - 1].max()), abs=1e-4)


def test_chat_stream_and_usage(live, client):
    messages = [{"role": "user", "content": "add two numbers"}]
    r = client.chat.completions.create(model=live.server.model_name, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=live.server.model_name, messages=messages, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the raw stream ends in data: [DONE]
    with httpx.stream("POST", live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": messages, "max_tokens": 3, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    r = client.chat.completions.create(model=live.server.model_name, messages=messages, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in r.choices[0].logprobs.content)


def test_models_tokenize_metrics(live, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [live.server.model_name]
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(live.url + "/tokenize", json={"prompt": "The quick brown fox"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    text = httpx.get(live.url + "/metrics", headers=h).text
    for name in ("quantship_time_to_first_token_seconds_bucket", "quantship_inter_token_latency_seconds",
                 "quantship_e2e_request_latency_seconds", "quantship_num_requests_running",
                 "quantship_num_requests_waiting", "quantship_prompt_tokens_total", "quantship_generation_tokens_total",
                 "quantship_request_success_total", "quantship_requests_total"):
        assert name in text, name
    assert 'model="llama",role="baseline"' in text


def test_openai_error_shapes(live, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=live.server.model_name, prompt="hello", max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live.server.model_name, prompt="hello", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live.server.model_name, prompt="hello", max_tokens=4, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live.server.model_name, prompt="hello", max_tokens=4, top_p=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hello", max_tokens=4)
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=live.server.model_name, prompt="hello", max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"


def test_auth_on_every_route_but_health(live):
    routes = [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("POST", "/tokenize"), ("GET", "/admin/rollout"), ("POST", "/admin/rollout"), ("POST", "/admin/rollback")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {KEY}x"}):
            r = httpx.request(method, live.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert set(r.json()["error"]) >= {"message", "type", "code"}
    assert httpx.get(live.url + "/health").status_code == 200


def test_oversized_and_malformed_requests_get_4xx(live):
    h = {"Authorization": f"Bearer {KEY}"}
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(live.url + "/v1/completions", content=big, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for body in (b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": ""}', b'{"prompt": [999999]}',
                 b'{"prompt": "x", "max_tokens": "many"}', b'{"prompt": "x", "stop": 3}',
                 b'{"prompt": "x", "presence_penalty": 1}', b'{"messages": "hi"}'):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = httpx.post(live.url + path, content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_queue_full_is_429_with_retry_after(chat_model):
    with LiveServer({"baseline": str(chat_model), "max_queue": 1}) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["a b", "c d"], "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 2}).status_code == 200


def test_503_while_loading(chat_model):
    with LiveServer({"baseline": str(chat_model)}, load=False) as s:
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        s.server.load()
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_client_disconnect_cancels_the_request(live):
    engine = live.server.baseline.engine
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "The quick", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 2:
                break
    deadline = time.time() + 10
    while engine.running or engine.waiting:
        assert time.time() < deadline, "the request kept running after the client left"
        time.sleep(0.05)
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'finished_reason="cancelled"' in text


def test_bounded_load_32_clients_zero_errors(live):
    """32 concurrent clients, each looping until 128 requests in all or 30 s: every request answered 200."""
    total, limit_s = 128, 30.0
    counts = {"sent": 0, "ok": 0}
    errors: list[str] = []
    lock = threading.Lock()

    async def client_loop(c):
        start = time.time()
        while time.time() - start < limit_s:
            with lock:
                if counts["sent"] >= total:
                    return
                counts["sent"] += 1
            try:
                r = await c.post(live.url + "/v1/completions", json={"prompt": "The quick brown", "max_tokens": 8,
                                                                     "temperature": 0.7, "seed": counts["sent"]})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1:
                    counts["ok"] += 1
                else:
                    errors.append(f"{r.status_code} {r.text[:100]}")
            except Exception as e:  # noqa: BLE001 - counted as a lost request
                errors.append(repr(e))

    async def main():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            await asyncio.gather(*(client_loop(c) for _ in range(32)))

    asyncio.run(main())
    assert errors == []
    assert counts["ok"] == counts["sent"] and counts["sent"] > 32


def test_bench_url_measures_the_server(live):
    from quantship.bench.http import run_http_bench
    from quantship.specs import BenchSpec

    spec = BenchSpec(model=str(live.server.baseline.path), concurrency=4, num_prompts=8, input_len=16, output_len=6)
    out = run_http_bench(live.url, spec, api_key=KEY)
    assert out["failed"] == 0 and out["completed"] == 8
    assert out["total_output_tokens"] == 8 * 6  # ignore_eos: every request produces its full length
    assert out["ttft_s"]["p95"] > 0 and out["tpot_s"]["p95"] > 0 and out["output_tok_s"] > 0


def test_lm_eval_local_completions_loglikelihood_matches_in_process(chat_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from quantship.models.load import load_model

    items = [("The quick brown", " fox jumps"), ("def add(a, b):", "\n    return a + b"),
             ("Perplexity and KL", " divergence")]
    with LiveServer({"baseline": str(chat_model)}) as s:
        lm = LocalCompletionsAPI(base_url=s.url + "/v1/completions", model=s.server.model_name,
                                 tokenizer=str(chat_model), tokenizer_backend="huggingface", max_retries=1)
        reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(items)]
        served = lm.loglikelihood(reqs, disable_tqdm=True)
    model, tok = load_model(chat_model, log=lambda *a, **k: None)
    for (ctx, cont), (ll, greedy) in zip(items, served):
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        x_ids = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c_ids):]
        ids = c_ids + x_ids
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(float(logp[p - 1, ids[p]]) for p in range(len(c_ids), len(ids)))
        greedy_ref = all(int(logp[p - 1].argmax()) == ids[p] for p in range(len(c_ids), len(ids)))
        assert ll == pytest.approx(expected, abs=1e-3) and greedy == greedy_ref
        assert math.isfinite(ll)


def test_cli_serve_refuses_bad_arguments_before_loading(capsys, tmp_path):
    from quantship.cli import main

    assert main(["serve"]) == 1 and "give a model" in capsys.readouterr().err
    assert main(["serve", "m", "--baseline", "b"]) == 1 and "not both" in capsys.readouterr().err
    assert main(["serve", "m", "--budget", "x.yaml"]) == 1 and "needs a --candidate" in capsys.readouterr().err
    bad = tmp_path / "live.yaml"
    bad.write_text("kld_mean: 1\n")
    assert main(["serve", "--baseline", "b", "--candidate", "c", "--budget", str(bad)]) == 1
    assert "unknown live budget term" in capsys.readouterr().err
    assert main(["serve", "m", "--canary", "120"]) == 1 and "percentage" in capsys.readouterr().err
