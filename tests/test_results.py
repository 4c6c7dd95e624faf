"""Typed reports (exact JSON round trips, model and data hashes), specs checked before any model
is loaded, API defaults from the specs, and library calls that leave the process as they found it."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

import quantship
from quantship import api, memory
from quantship.cli import main as cli
from quantship.evaluate.compare import compare
from quantship.evaluate.results import EvalReport, TaskResults, reports_from_json, reports_to_json
from quantship.fsutil import canonical_json, hash_tree, sha256_bytes
from quantship.models.digest import files_digest, folder_sha256, state_dict_sha256
from quantship.specs import BenchSpec, EvalSpec, QuantSpec, default_of

QUIET = dict(progress=False, log=lambda *a, **k: None)
TEXT = " ".join(["The quick brown fox jumps over the lazy dog and quantization maps numbers to a grid."] * 40)


def _text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    return f


# ----- EvalReport --------------------------------------------------------------------------------
def test_eval_report_round_trips_exactly_and_names_its_models(tiny_models, tmp_path):
    art = quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path / "q", **QUIET)
    rep = quantship.evaluate(str(tiny_models["llama"]), str(art), texts=[str(_text(tmp_path))], ctx=32, **QUIET)
    assert isinstance(rep, EvalReport)
    data = rep.to_json()
    assert EvalReport.from_json(data) == rep
    through_text = json.loads(json.dumps(data))
    assert EvalReport.from_json(through_text).to_json() == through_text
    # the candidate is named by the artifact's content hash, the baseline by its files' hashes
    manifest = quantship.verify(art)
    assert rep.candidate.sha256 == manifest["content_sha256"] and rep.candidate.digest == "artifact"
    assert folder_sha256(art) == (manifest["content_sha256"], "artifact")
    assert rep.baseline.sha256 == files_digest(hash_tree(tiny_models["llama"])) and rep.baseline.digest == "files"
    assert rep.matches(rep.baseline.sha256, manifest["content_sha256"], rep.data_sha256)
    assert not rep.matches(rep.baseline.sha256, "0" * 64)
    assert rep.candidate.bits_per_weight == manifest["bits_per_weight"]["quantized_layers"]


def test_a_builtins_digest_is_the_one_of_its_files_recorded_at_pull_time(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    hashed = folder_sha256(folder)
    assert hashed == (files_digest(hash_tree(folder)), "files")
    (folder / "quantship-source.json").write_text(json.dumps({"name": "m", "files": hash_tree(folder)}))
    assert folder_sha256(folder) == hashed  # the recorded table, the manifest itself left out
    (folder / "quantship-source.json").write_text(json.dumps({"name": "m", "files": {"model.safetensors": "0" * 64}}))
    assert folder_sha256(folder)[0] != hashed[0]  # read from the record, not the files


def test_data_hash_changes_with_the_text_and_the_windows(tiny_models, tmp_path):
    from conftest import build_tiny_model

    pair = build_tiny_model("llama", seed=0)
    f = _text(tmp_path)
    a = compare(pair, pair, texts=[str(f)], spec=EvalSpec(ctx=32, max_windows=2), progress=False)
    b = compare(pair, pair, texts=[str(f)], spec=EvalSpec(ctx=32, max_windows=2, batch_size=1), progress=False)
    c = compare(pair, pair, texts=[str(f)], spec=EvalSpec(ctx=32, max_windows=3), progress=False)
    f.write_text(TEXT + " more")
    d = compare(pair, pair, texts=[str(f)], spec=EvalSpec(ctx=32, max_windows=2), progress=False)
    assert a.data_sha256 == b.data_sha256  # batch size does not change what is scored
    assert len({a.data_sha256, c.data_sha256, d.data_sha256}) == 3
    # in-memory models are named by their state dict
    assert a.baseline.sha256 == a.candidate.sha256 == state_dict_sha256(pair[0]) and a.baseline.digest == "state_dict"
    other = build_tiny_model("llama", seed=1)[0]
    assert state_dict_sha256(other) != state_dict_sha256(pair[0])


def test_task_results_round_trip():
    suites = {
        "math": {"baseline": 0.5, "candidate": 0.25, "delta": -0.25, "ci95": [-0.5, 0.0], "p_value": 0.5,
                 "significant": False, "flips": {"pass_to_fail": 1, "fail_to_pass": 0}, "n": 4, "content_hash": "ab",
                 "worst_flips": [{"id": "m1", "prompt": "1+1", "baseline_output": "2", "candidate_output": "3",
                                  "candidate_detail": "wrong"}]},
        "refusal": {"baseline": 1.0, "candidate": 1.0, "delta": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0,
                    "significant": False, "flips": {"pass_to_fail": 0, "fail_to_pass": 0}, "n": 2, "content_hash": "cd",
                    "worst_flips": [], "refusal_rate": {"baseline": 0.5, "candidate": 0.5}, "behaviour_agreement": 1.0},
        "multilingual": {"slices": {"de": {"tokens": 10, "kld_mean": 0.1}}, "n": 1, "content_hash": "ef"},
    }
    tasks = TaskResults.from_suites(suites)
    expected = sha256_bytes(canonical_json({"math": "ab", "refusal": "cd", "multilingual": "ef"}).encode())
    assert tasks.content_sha256 == expected
    assert tasks.to_json() == {**suites, "content_sha256": expected}
    assert TaskResults.from_json(tasks.to_json()) == tasks
    assert tasks.suites["math"].ci95 == (-0.5, 0.0) and tasks.suites["refusal"].behaviour_agreement == 1.0


def test_eval_json_keeps_its_keys_and_adds_the_hashes(tiny_models, tmp_path):
    a = quantship.quantize(str(tiny_models["llama"]), "w8", out=tmp_path / "a", **QUIET)
    b = quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path / "b", **QUIET)
    text = str(_text(tmp_path))
    one, several = tmp_path / "one.json", tmp_path / "several.json"
    assert cli(["eval", str(tiny_models["llama"]), str(a), "--text", text, "--ctx", "32", "--json", str(one)]) == 0
    assert cli(["eval", str(tiny_models["llama"]), str(a), str(b), "--text", text, "--ctx", "32",
                "--json", str(several)]) == 0
    single = json.loads(one.read_text())
    assert {"baseline", "candidate", "tokens", "ppl", "kld", "top1_agreement", "ece", "delta_p", "texts",
            "settings", "models", "data_sha256"} == set(single)
    assert single["baseline"] == str(tiny_models["llama"]) and single["candidate"] == str(a)
    assert set(single["settings"]) == {"ctx", "max_windows", "batch_size", "texts", "scored"}
    multi = json.loads(several.read_text())
    assert set(multi) == {"baseline", "candidates"} and list(multi["candidates"]) == [str(a), str(b)]
    reports = reports_from_json(multi)
    assert reports_to_json(reports) == multi
    assert reports[0].to_json()["kld"] == single["kld"]  # the same measurement either way


def test_several_candidates_through_the_api(tiny_models, tmp_path):
    a = quantship.quantize(str(tiny_models["llama"]), "w8", out=tmp_path / "a", **QUIET)
    b = quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path / "b", **QUIET)
    reports = quantship.evaluate(str(tiny_models["llama"]), [str(a), str(b)], texts=[str(_text(tmp_path))], ctx=32,
                                 **QUIET)
    assert [r.candidate.name for r in reports] == [str(a), str(b)]
    assert reports[0].kld.mean < reports[1].kld.mean  # w8 is closer than w4
    assert reports[0].baseline == reports[1].baseline


# ----- specs first, then models --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    ({"texts": ["/no/such/file.txt"]}, FileNotFoundError, "no such file"),
    ({"suites": ["poetry"]}, ValueError, "unknown suite"),
    ({"suite_files": ["/no/such/suite.jsonl"]}, FileNotFoundError, "suite-file"),
    ({"ctx": 8}, ValueError, "ctx"),
    ({"limit": 0}, ValueError, "limit"),
])
def test_eval_settings_are_checked_before_any_model_is_loaded(monkeypatch, kwargs, error, message):
    import quantship.models.load as load

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(load, "load_model", no_loading)
    monkeypatch.setattr(load, "resolve_model", no_loading)
    with pytest.raises(error, match=message):
        quantship.evaluate("smollm2-135m", "out/none", **kwargs, **QUIET)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gptq", "method_params": {"no_such": 1}}, "no parameter"),
    ({"method": "smoothquant"}, "does not support"),
    ({"method": "gptq", "calib": "news:-1"}, "positive"),
    ({"method": "nope"}, "unknown method"),
])
def test_quantize_settings_are_checked_before_the_model_is_loaded(monkeypatch, kwargs, message):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(api, "load_model", no_loading)
    monkeypatch.setattr(api, "resolve_model", no_loading)
    with pytest.raises(ValueError, match=message):
        quantship.quantize("smollm2-135m", "w4g64", **kwargs, **QUIET)


def test_bench_settings_are_checked_before_the_model_is_loaded(monkeypatch):
    import quantship.bench.run as run

    monkeypatch.setattr(run, "load_engine", lambda spec: pytest.fail("the engine was built"))
    with pytest.raises(ValueError, match="KV cache"):
        quantship.bench("smollm2-135m", kv="fp4", measure_bandwidth=False)


def test_api_defaults_are_the_specs_defaults():
    q = inspect.signature(api.quantize).parameters
    for name in ("method", "ignore", "quantize_head", "seed", "calib", "calib_samples", "calib_seqlen"):
        assert q[name].default == default_of(QuantSpec, name), name
    e = inspect.signature(api.evaluate).parameters
    for name in ("texts", "ctx", "max_windows", "batch_size", "suites", "suite_files", "full", "limit", "seed"):
        assert e[name].default == default_of(EvalSpec, name), name
    assert BenchSpec.__module__ == "quantship.specs"


# ----- no process-global side effects ----------------------------------------------------------------
def _logits(model, tok):
    ids = tok(TEXT[:200], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_calibrated_quantize_leaves_the_process_and_the_float_model_as_they_were(tiny_models, monkeypatch):
    model, tok = quantship.load(tiny_models["llama"])
    before = _logits(model, tok)
    calls = []
    real = memory._libc_call
    monkeypatch.setattr(memory, "_libc_call", lambda name, *a: calls.append(name) or real(name, *a))
    torch.manual_seed(1234)
    threads, rng, path = torch.get_num_threads(), torch.get_rng_state(), os.environ.get("PATH")
    threshold = memory.mmap_threshold_set()
    result = quantship.quantize((model, tok), "w4g32", method="gptq", calib_samples=4, calib_seqlen=32, **QUIET)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)  # the pipeline's seed did not leak out
    assert os.environ.get("PATH") == path
    assert "mallopt" not in calls and memory.mmap_threshold_set() == threshold
    assert torch.equal(_logits(model, tok), before)  # the caller's float model is untouched
    assert result.modules and not torch.equal(_logits(result.model, tok), before)
    assert result.source == tiny_models["llama"]


def test_reclaiming_memory_is_the_callers_choice(tiny_models, monkeypatch):
    import quantship.methods.layerwise as layerwise

    released = []
    monkeypatch.setattr(layerwise, "release_tensor_memory", lambda t: released.append(t.shape) or False)
    kw = dict(method="gptq", calib_samples=4, calib_seqlen=32, **QUIET)
    quantship.quantize(str(tiny_models["llama"]), "w4g32", **kw)
    assert released == []
    saved = memory.mmap_threshold_set()
    try:
        quantship.quantize(str(tiny_models["llama"]), "w4g32", reclaim_memory=True, **kw)
    finally:
        memory._mmap_threshold = saved  # the record only; this test's process keeps glibc's setting
    assert released and not memory.reclaim_enabled()


def test_mmap_threshold_context_restores_the_value_before_it(monkeypatch):
    set_to = []
    monkeypatch.setattr(memory, "_libc_call", lambda name, *a: set_to.append(a[1]) if name == "mallopt" else None)
    monkeypatch.setattr(memory, "_mmap_threshold", 4 * 2**20)  # as if a caller had set 4 MiB
    with memory.large_allocations_mapped(2**20):
        assert memory.mmap_threshold_set() == 2**20
        with memory.large_allocations_mapped(2**16):
            assert memory.mmap_threshold_set() == 2**16
        assert memory.mmap_threshold_set() == 2**20
    assert memory.mmap_threshold_set() == 4 * 2**20
    assert set_to == [2**20, 2**16, 2**20, 4 * 2**20]


def test_native_build_restores_path(monkeypatch, tmp_path):
    import shutil

    import torch.utils.cpp_extension as cpp

    from quantship import native

    monkeypatch.setenv("QUANTSHIP_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no ninja on PATH
    seen = []
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(os.environ["PATH"]))
    native._build()
    assert seen and seen[0] != "/usr/bin:/bin" and seen[0].endswith("/usr/bin:/bin")  # the venv's bin first
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_native_can_be_switched_off_after_it_was_used(monkeypatch):
    from quantship import native

    monkeypatch.setattr(native, "_build_outcome", {"ok": True, "reason": None})
    assert native.available()
    monkeypatch.setenv("QUANTSHIP_NATIVE", "0")
    assert not native.available() and "QUANTSHIP_NATIVE=0" in native.unavailable_reason()
    monkeypatch.delenv("QUANTSHIP_NATIVE")
    assert native.available()
