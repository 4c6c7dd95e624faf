"""Rollout: canary / sticky routing, shadow comparison, live budget and automatic rollback, state
restored after a restart, fallback to the baseline (non-finite logits, a dead candidate engine)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import LiveServer, write_yaml  # noqa: E402

from quantship.serve.live_budget import LiveBudget, load_live_budget, parse_live_budget  # noqa: E402
from quantship.serve.router import sticky_share  # noqa: E402
from quantship.serve.shadow import compare_logits  # noqa: E402

ADMIN = "admin-key-456"


@pytest.fixture(scope="module")
def bad_candidate(tiny_models, tmp_path_factory):
    import quantship

    out = tmp_path_factory.mktemp("cand") / "w2g64"
    return quantship.quantize(str(tiny_models["llama"]), "w2g64", method="rtn", out=str(out))


@pytest.fixture(scope="module")
def good_candidate(tiny_models, tmp_path_factory):
    """The baseline's own weights in another folder: its distributions are the baseline's (KLD 0)."""
    import shutil

    dst = tmp_path_factory.mktemp("same") / "llama-copy"
    shutil.copytree(tiny_models["llama"], dst)
    return dst


def _complete(url: str, n: int, headers=None, max_tokens: int = 6) -> list[httpx.Response]:
    return [httpx.post(url + "/v1/completions", headers=headers or {}, timeout=60,
                       json={"prompt": f"The quick brown fox {i}", "max_tokens": max_tokens, "temperature": 0})
            for i in range(n)]


def _wait(predicate, timeout: float = 30.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# ----- units ------------------------------------------------------------------------------------------
def test_live_budget_terms_optional_defaults_and_errors(tmp_path):
    b = load_live_budget(write_yaml(tmp_path / "b.yaml", {"shadow_kld_mean": 0.5}))
    assert b == LiveBudget(shadow_kld_mean=0.5) and b.window_requests == 32 and b.failure_limit == 1
    assert b.window_seconds is None
    assert b.check({"shadow_kld_mean": 0.7}) and not b.check({"shadow_kld_mean": 0.3})
    assert not b.check({"shadow_kld_mean": None})  # no data in the window: not checked
    t = LiveBudget(top1_agreement=0.9, nonfinite_total=0, error_rate=0.01, ttft_p95_s=2.0)
    assert t.check({"top1_agreement": 0.8, "nonfinite_total": 1, "error_rate": 0.5, "ttft_p95_s": 3.0}) and len(
        t.check({"top1_agreement": 0.8, "nonfinite_total": 1, "error_rate": 0.5, "ttft_p95_s": 3.0})) == 4
    assert t.check({"top1_agreement": 0.95, "nonfinite_total": 0, "error_rate": 0.0, "ttft_p95_s": 1.0}) == []
    with pytest.raises(ValueError, match="unknown live budget term.*valid"):
        parse_live_budget({"kld": 1})
    with pytest.raises(ValueError, match="failure_limit"):
        parse_live_budget({"failure_limit": 0})
    with pytest.raises(ValueError, match="top1_agreement"):
        parse_live_budget({"top1_agreement": 2})


def test_compare_logits_kld_top1_and_likelihood():
    torch.manual_seed(0)
    a = torch.randn(5, 11)
    same = compare_logits(a, a.clone(), torch.tensor([1, 2, 3, 4, 5]))
    assert same.kld_mean == 0.0 and same.top1_agreement == 1.0 and same.loglik_baseline == same.loglik_candidate
    b = a + torch.randn(5, 11)
    r = compare_logits(a, b, torch.tensor([1, 2, 3, 4, 5]))
    pa, lb = torch.softmax(a, -1), torch.log_softmax(b, -1)
    kl = (pa * (torch.log_softmax(a, -1) - lb)).sum(-1)
    assert r.kld_mean == pytest.approx(float(kl.mean()), rel=1e-5) and r.kld_max == pytest.approx(float(kl.max()), rel=1e-5)
    assert r.top1_agreement == pytest.approx(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    nan = b.clone()
    nan[2, 3] = float("nan")
    assert compare_logits(a, nan, torch.tensor([1, 2, 3, 4, 5])).nonfinite_candidate == 1


def test_sticky_share_is_stable_and_spread():
    assert sticky_share("user-1") == sticky_share("user-1")
    shares = [sticky_share(f"user-{i}") for i in range(2000)]
    assert all(0 <= s < 100 for s in shares)
    assert 0.4 < sum(s < 50 for s in shares) / len(shares) < 0.6


# ----- live servers -----------------------------------------------------------------------------------
def test_bad_candidate_is_rolled_back_and_stays_rolled_back_after_restart(tiny_models, bad_candidate, tmp_path):
    budget = load_live_budget(write_yaml(tmp_path / "live.yaml", {"shadow_kld_mean": 1e-6, "window_requests": 4}))
    cfg = {"baseline": str(tiny_models["llama"]), "candidate": str(bad_candidate), "canary": 0, "shadow": 100,
           "budget": budget, "state_dir": str(tmp_path / "state"), "admin_key": ADMIN}
    with LiveServer(cfg) as s:
        h = {"Authorization": f"Bearer {ADMIN}"}
        assert httpx.post(s.url + "/admin/rollout", json={"canary": 50}, headers=h).status_code == 200
        assert all(r.status_code == 200 for r in _complete(s.url, 4))
        _wait(lambda: s.server.rollout.state.rolled_back)
        snap = httpx.get(s.url + "/admin/rollout", headers=h).json()
        assert snap["state"]["canary"] == 0 and snap["state"]["rolled_back"]
        assert "shadow_kld_mean" in snap["state"]["reason"]
        window = snap["closed_windows"][-1]
        assert window["observed"]["shadow_kld_mean"] > 1e-6 and window["shadowed"] == 4  # evidence
        assert snap["rollback"]["served_requests"] == 4
        metrics = httpx.get(s.url + "/metrics").text
        assert 'quantship_rollbacks_total{model="w2g64",trigger="budget"} 1.0' in metrics
        assert 'quantship_canary_share{model="w2g64"} 0.0' in metrics
        assert "quantship_shadow_kld_bucket" in metrics
        # after the rollback every answer comes from the baseline
        assert {r.headers["x-quantship-served-by"] for r in _complete(s.url, 6)} == {"baseline"}
    saved = json.loads((tmp_path / "state" / "rollout.json").read_text())
    assert saved["rolled_back"] and saved["canary"] == 0
    with LiveServer({**cfg, "canary": 50}) as s2:  # a restart with --canary 50 keeps the rollback
        assert s2.server.rollout.state.rolled_back and s2.server.router.canary == 0
        assert {r.headers["x-quantship-served-by"] for r in _complete(s2.url, 4)} == {"baseline"}


def test_good_candidate_is_not_rolled_back(tiny_models, good_candidate, tmp_path):
    budget = LiveBudget(shadow_kld_mean=1e-6, top1_agreement=0.99, nonfinite_total=0, window_requests=4)
    with LiveServer({"baseline": str(tiny_models["llama"]), "candidate": str(good_candidate), "canary": 50,
                     "shadow": 100, "budget": budget}) as s:
        assert all(r.status_code == 200 for r in _complete(s.url, 16))
        _wait(lambda: s.server.rollout.totals["windows"] >= 3)
        snap = s.server.rollout.snapshot()
        assert not snap["state"]["rolled_back"] and snap["state"]["canary"] == 50
        assert all(w["breaches"] == [] and w["observed"]["shadow_kld_mean"] == 0.0 for w in snap["closed_windows"])


def test_admin_routes_need_the_admin_key_and_canary_routes(tiny_models, good_candidate):
    cfg = {"baseline": str(tiny_models["llama"]), "candidate": str(good_candidate), "canary": 0, "api_key": "user",
           "admin_key": ADMIN, "sticky_header": "x-user-id"}
    with LiveServer(cfg) as s:
        user, admin = {"Authorization": "Bearer user"}, {"Authorization": f"Bearer {ADMIN}"}
        assert httpx.post(s.url + "/admin/rollout", json={"canary": 100}, headers=user).status_code == 401
        assert httpx.get(s.url + "/admin/rollout", headers=user).status_code == 200
        assert httpx.post(s.url + "/admin/rollout", json={"canary": 101}, headers=admin).status_code == 400
        assert httpx.post(s.url + "/admin/rollout", json={"canary": 100}, headers=admin).json()["canary"] == 100
        assert {r.headers["x-quantship-served-by"] for r in _complete(s.url, 3, user)} == {"candidate"}
        httpx.post(s.url + "/admin/rollout", json={"canary": 50}, headers=admin)
        sides = {}
        for u in range(12):
            got = {r.headers["x-quantship-served-by"]
                   for r in _complete(s.url, 3, {**user, "x-user-id": f"u{u}"}, max_tokens=2)}
            assert len(got) == 1  # sticky: a user always lands on the same side
            sides[u] = got.pop()
        assert set(sides.values()) == {"baseline", "candidate"}
        r = httpx.post(s.url + "/admin/rollback", json={"reason": "test"}, headers=admin).json()
        assert r["rolled_back"] and r["canary"] == 0 and r["reason"] == "test"
        assert 'trigger="manual"} 1.0' in httpx.get(s.url + "/metrics", headers=user).text


def test_candidate_engine_failure_mid_traffic_gives_no_client_error(tiny_models, good_candidate):
    with LiveServer({"baseline": str(tiny_models["llama"]), "candidate": str(good_candidate), "canary": 100,
                     "max_batch": 4}) as s:
        steps = {"n": 0}

        def fail_after(info):
            steps["n"] += 1
            if steps["n"] > 20:
                raise RuntimeError("injected worker failure")

        s.server.candidate.engine.add_step_hook(fail_after)

        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(
                    c.post(s.url + "/v1/completions", json={"prompt": f"The quick {i}", "max_tokens": 12,
                                                            "temperature": 0, "ignore_eos": True})
                    for i in range(24)))

        responses = asyncio.run(main())
        assert [r.status_code for r in responses] == [200] * 24
        assert all(r.json()["usage"]["completion_tokens"] == 12 for r in responses)
        roles = [r.headers["x-quantship-served-by"] for r in responses]
        assert "candidate+baseline" in roles or "baseline" in roles
        health = httpx.get(s.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["candidate"] == "dead"
        assert 'reason="engine_dead"' in httpx.get(s.url + "/metrics").text
        assert {r.headers["x-quantship-served-by"] for r in _complete(s.url, 3)} == {"baseline"}


def test_nonfinite_candidate_answer_is_finished_by_the_baseline(tiny_models, good_candidate):
    with LiveServer({"baseline": str(tiny_models["llama"]), "candidate": str(good_candidate), "canary": 100}) as s:
        expected = httpx.post(s.url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 8,
                                                               "temperature": 0}).json()["choices"][0]["text"]
        with torch.no_grad():
            s.server.candidate.engine.model.model.norm.weight.fill_(float("nan"))
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-quantship-served-by"] == "candidate+baseline"
        assert r.json()["choices"][0]["text"] == expected  # the baseline's answer, not NaN garbage
        metrics = httpx.get(s.url + "/metrics").text
        assert 'quantship_fallbacks_total{model="llama-copy",reason="nonfinite",role="candidate"} 1.0' in metrics
        assert 'source="served"' in metrics
