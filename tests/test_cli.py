"""The command line: exit codes and messages for the everyday and the wrong."""

from __future__ import annotations

import pytest

from quantship.cli import main as cli
from quantship.specs import EvalSpec, QuantSpec, default_of, parse_method_params


def test_unknown_builtin_model_lists_the_valid_ones(capsys):
    assert cli(["model", "pull", "llama-7b"]) == 1
    assert "smollm2-135m" in capsys.readouterr().err


def test_schemes_and_model_list_print(capsys):
    assert cli(["schemes"]) == 0
    out = capsys.readouterr().out
    assert "w4g32-asym" in out and "nf4g64" in out
    assert cli(["model", "list"]) == 0
    assert "gemma3-270m" in capsys.readouterr().out


def test_quantize_cli_writes_and_prints_a_table(tiny_models, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(["quantize", str(tiny_models["gpt2"]), "--scheme", "w4g32", "--clip-search", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "quantized layers" in text
    assert cli(["quantize", str(tiny_models["gpt2"]), "--scheme", "w4g32", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


def test_verify_of_a_missing_folder_fails_cleanly(tmp_path, capsys):
    assert cli(["verify", str(tmp_path / "nothing")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_cli_defaults_come_from_the_dataclasses():
    from quantship.cli import build_parser

    args = build_parser().parse_args(["eval", "a", "b"])
    assert args.ctx == default_of(EvalSpec, "ctx") and args.max_windows == default_of(EvalSpec, "max_windows")
    args = build_parser().parse_args(["quantize", "m", "--scheme", "w8"])
    assert args.method == default_of(QuantSpec, "method") and args.calib_samples == default_of(QuantSpec, "calib_samples")


def test_method_params_are_typed_and_validated():
    assert parse_method_params(["clip_search=true", "clip-grid=10", "clip_min=0.6", "x=abc"]) == (
        ("clip_search", True), ("clip_grid", 10), ("clip_min", 0.6), ("x", "abc"))
    with pytest.raises(ValueError, match="key=value"):
        parse_method_params(["oops"])
    with pytest.raises(ValueError, match="valid regular expression"):
        QuantSpec(scheme="w8", ignore=("(",))


def test_eval_with_suites_adds_tasks_to_the_json(tiny_models, tmp_path):
    import json

    import quantship

    art = quantship.quantize(str(tiny_models["llama"]), "w8", out=tmp_path / "q", progress=False, log=lambda *a: None)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r.json"
    assert cli(["eval", str(tiny_models["llama"]), str(art), "--text", str(text), "--ctx", "32", "--suites",
                "math,qa", "--limit", "2", "--items-dir", str(tmp_path / "items"), "--json", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    for suite in ("math", "qa"):
        assert set(tasks[suite]) >= {"baseline", "candidate", "delta", "ci95", "p_value", "flips"}
    assert len(tasks["content_sha256"]) == 64
    assert (tmp_path / "items" / "q" / "tasks-math.jsonl").is_file()
    assert cli(["eval", str(tiny_models["llama"]), str(art), "--text", str(text), "--suites", "poetry"]) == 1
