"""An artifact that was changed never loads; --force never destroys what quantship did not write;
bad source weights, broken model folders and bad output locations are refused before any work."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantship
from quantship.artifact import ArtifactError, load_artifact, manifest_digest, verify_artifact
from quantship.cli import main as cli

QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def w4_artifact(tiny_models, tmp_path_factory) -> Path:
    return quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path_factory.mktemp("a") / "w4", **QUIET)


@pytest.fixture
def artifact(w4_artifact, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(w4_artifact, copy)
    return copy


def _edit_manifest(path: Path, edit, *, reseal: bool = False) -> None:
    manifest = json.loads((path / "quantship.json").read_text())
    edit(manifest)
    if reseal:  # a forger who also recomputes the manifest digest (signatures catch that, not hashes)
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "quantship.json").write_text(json.dumps(manifest))


def _retag_as_nf4(manifest: dict) -> None:
    for info in manifest["modules"].values():
        info["scheme"], info["format"] = "nf4g32", "nf4"
    manifest["scheme"] = "nf4g32"


def test_manifest_scheme_edit_is_refused_by_verify_and_load(artifact, capsys):
    _edit_manifest(artifact, _retag_as_nf4)
    assert cli(["verify", str(artifact)]) == 1
    err = capsys.readouterr().err
    assert "manifest_sha256 does not match" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ArtifactError, match="manifest was edited"):
        quantship.load(artifact)


def test_resealed_manifest_is_cross_checked_against_the_tensors(artifact):
    name = next(iter(json.loads((artifact / "quantship.json").read_text())["modules"]))

    def widen(m):
        m["modules"][name]["shape"][1] *= 2

    _edit_manifest(artifact, widen, reseal=True)
    with pytest.raises(ArtifactError, match=rf"{name}.*shape"):
        load_artifact(artifact)


def test_resealed_asym_claim_without_offsets_is_refused(artifact):
    name = next(iter(json.loads((artifact / "quantship.json").read_text())["modules"]))

    def asym(m):
        m["modules"][name]["scheme"] = "w4g32-asym"

    _edit_manifest(artifact, asym, reseal=True)
    with pytest.raises(ArtifactError, match=rf"needs tensor {name}\.offsets"):
        load_artifact(artifact)


def test_manifest_field_types_are_checked(artifact):
    _edit_manifest(artifact, lambda m: m["files"].update({"../escape": "0" * 64}))
    with pytest.raises(ArtifactError, match="invalid path '../escape'"):
        verify_artifact(artifact)


def test_artifact_files_are_world_readable(w4_artifact):
    for p in w4_artifact.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p.name


def _one_error_line(err: str) -> str:
    """The CLI's single `error:` line (transformers may print a loading bar before it); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- --force -------------------------------------------------------------------------------------

def test_force_refuses_a_folder_of_user_files(tiny_models, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    rc = cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", str(mine), "--force"])
    assert rc == 1
    assert "not a quantship artifact" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1


def test_force_refuses_the_source_model(tiny_models, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert cli(["quantize", str(src), "--scheme", "w8", "-o", str(src), "--force"]) == 1
    assert "source model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_force_refuses_an_artifact_holding_foreign_files(artifact, tiny_models, capsys):
    (artifact / "notes.txt").write_text("mine")
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", str(artifact), "--force"]) == 1
    assert "notes.txt" in capsys.readouterr().err and (artifact / "notes.txt").exists()


def test_force_replaces_an_artifact_and_an_empty_folder_is_used(artifact, tiny_models, tmp_path):
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", str(artifact), "--force"]) == 0
    assert verify_artifact(artifact)["scheme"] == "w8"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", str(empty)]) == 0
    assert verify_artifact(empty)["scheme"] == "w8"


# --- bad source weights and broken folders -----------------------------------------------------

def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_nan_weights_are_refused_naming_the_tensor(tiny_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _copy_model(tiny_models["llama"], tmp_path / "nan")
    state = load_file(str(src / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    state[key][0, :3] = float("nan")
    state[key][1, 0] = float("inf")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli(["quantize", str(src), "--scheme", "w8", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{key} (4 of" in _one_error_line(err) and "non-finite" in err
    assert not out.exists()


def test_non_finite_scales_are_never_written(tiny_models, tmp_path, monkeypatch):
    import quantship.methods.rtn as rtn

    original = rtn.quantize_weight  # the grid function RTN calls

    def poisoned(*a, **k):
        qw = original(*a, **k)
        qw.scale.view(-1)[0] = float("nan")
        return qw

    monkeypatch.setattr(rtn, "quantize_weight", poisoned)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"refusing to write the artifact: non-finite.*\.scales"):
        quantship.quantize(str(tiny_models["llama"]), "w8", out=out, **QUIET)
    assert not out.exists()


@pytest.mark.parametrize("case", ["truncated", "config_only", "pickle"])
def test_broken_model_folders_give_one_line_errors(tiny_models, tmp_path, capsys, case):
    src = _copy_model(tiny_models["llama"], tmp_path / case)
    weights = src / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "model.safetensors is not a readable safetensors file"
    elif case == "config_only":
        for p in src.iterdir():
            if p.name != "config.json":
                p.unlink()
        expected = "has no *.safetensors weights"
    else:
        from transformers import AutoModelForCausalLM

        weights.unlink()
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        torch.save(model.state_dict(), src / "pytorch_model.bin")
        expected = "pytorch_model.bin is a pickle checkpoint"
    assert cli(["quantize", str(src), "--scheme", "w8", "-o", str(tmp_path / "out")]) == 1
    assert expected in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --- checks before any work --------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if quantize gets as far as loading the model."""
    import quantship.api as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(api, "load_model", boom)


@pytest.mark.parametrize("where,message", [
    ("/proc/qs_out", "not writable"),
    ("a_file/sub", "is a file, not a folder"),
])
def test_bad_output_locations_fail_before_loading(tiny_models, tmp_path, capsys, no_model_load, where, message):
    (tmp_path / "a_file").write_text("x")
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", where]) == 1
    err = capsys.readouterr().err
    assert message in err and ".partial" not in err


def test_not_enough_space_fails_before_loading(tiny_models, tmp_path, capsys, no_model_load, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20))
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "-o", str(tmp_path / "o")]) == 1
    assert "not enough free space" in capsys.readouterr().err


def test_unknown_method_and_parameter_fail_before_loading(tiny_models, capsys, no_model_load):
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "--method", "gtpq", "-o", "x"]) == 1
    assert "unknown method 'gtpq'" in capsys.readouterr().err
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w8", "--param", "nope=1", "-o", "x"]) == 1
    assert "no parameter" in capsys.readouterr().err


def test_schemes_header_shows_the_whole_grammar(capsys):
    assert cli(["schemes"]) == 0
    out = capsys.readouterr().out
    assert "[g{group}|pt]" in out and "-asym" in out


def test_the_command_line_does_not_import_torch_to_parse():
    code = "import sys; from quantship.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- a killed writer leaves nothing under the output name ----------------------------------------

def test_sigkill_leaves_no_partial_artifact_and_a_rerun_succeeds(tiny_models, tmp_path):
    import random
    import signal
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "quantship.cli", "quantize", str(tiny_models["llama"]), "--scheme", "w4g32",
           "--method", "hqq", "-o", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tmp_path)
    full = time.perf_counter() - started
    import shutil

    shutil.rmtree(out)
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
        time.sleep(rng.uniform(0.3, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the rename happened before the kill: then it is a whole, valid artifact
            verify_artifact(out)
            shutil.rmtree(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    verify_artifact(out)
    assert not list(tmp_path.glob(".killed.*"))  # the rerun cleared the dead writers' temporary folders


def test_eval_ctx_beyond_the_model_context_fails_before_loading(tiny_models, capsys, monkeypatch):
    import quantship.models.load as load

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad --ctx was found")

    monkeypatch.setattr(load, "load_model", boom)
    llama = str(tiny_models["llama"])  # max_position_embeddings 256
    assert cli(["eval", llama, llama, "--ctx", "512"]) == 1
    assert "--ctx 512 exceeds the context" in _one_error_line(capsys.readouterr().err)
