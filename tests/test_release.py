"""Release ladders (first passing rung chosen, reruns reuse every rung, an interrupted rung leaves
nothing half-written), recipe errors, reproduce (identical / different / refused), and the HTML
report in a real headless browser."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from quantship.cli import main as cli
from quantship.gate.release import load_recipe, run_release

QUIET = dict(progress=False, log=lambda *a, **k: None)


def _recipe(tmp_path, tiny_models, ladder="[{scheme: w2g32, method: rtn}, {scheme: w8, method: rtn}]",
            kld="1.0e-5") -> Path:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog; numbers map to a grid."] * 60))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_models['llama']}\n"
                      f"budget: {{kld_mean: {kld}, slices: {{t.txt: {{kld_mean: {kld}}}}}}}\n"
                      f"eval: {{ctx: 32, max_windows: 3, texts: [{text}]}}\n"
                      f"ladder: {ladder}\n")
    return recipe


def test_release_picks_the_first_passing_rung_and_a_rerun_reuses_every_rung(tiny_models, tmp_path, monkeypatch):
    recipe, run = _recipe(tmp_path, tiny_models), tmp_path / "run"
    d = run_release(recipe, run, **QUIET)
    assert [r["name"] for r in d["rungs"]] == ["w2g32 rtn", "w8 rtn"]
    assert not d["rungs"][0]["passed"] and {t["name"] for t in d["rungs"][0]["failed"]} >= {"kld_mean"}
    assert d["chosen"]["name"] == "w8 rtn" and Path(d["chosen"]["artifact"]).is_dir()
    assert all(r["steps"] == {"quantize": "ran", "eval": "ran"} for r in d["rungs"])
    first = json.loads((run / "decision.json").read_text())
    # rerun: nothing is quantized or evaluated again
    import quantship.api
    import quantship.evaluate.run

    def forbidden(*a, **k):
        raise AssertionError("a finished rung was measured again")

    monkeypatch.setattr(quantship.api, "quantize", forbidden)
    monkeypatch.setattr(quantship.evaluate.run, "evaluate_models", forbidden)
    again = run_release(recipe, run, **QUIET)
    assert all(r["steps"] == {"quantize": "reused", "eval": "reused"} for r in again["rungs"])
    assert again["chosen"] == first["chosen"]
    assert [r["key"] for r in again["rungs"]] == [r["key"] for r in first["rungs"]]
    assert (run / "report.html").exists() is False
    assert cli(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    md = (run / "report.md").read_text()
    assert "**Chosen: w8 rtn**" in md and "w2g32 rtn" in md


def test_a_changed_input_gets_a_new_rung_key(tiny_models, tmp_path):
    from quantship.gate.release import rung_key

    recipe = _recipe(tmp_path, tiny_models)
    a = load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("max_windows: 3", "max_windows: 2"))
    b = load_recipe(recipe)
    assert rung_key("s", a.ladder[0], a.budget) != rung_key("s", b.ladder[0], b.budget)
    assert rung_key("s", a.ladder[0], a.budget) != rung_key("t", a.ladder[0], a.budget)
    assert rung_key("s", a.ladder[0], a.budget) == rung_key("s", load_recipe_copy(a).ladder[0], a.budget)


def load_recipe_copy(recipe):
    from quantship.gate.release import parse_recipe

    return parse_recipe(recipe.source)


def test_an_interrupted_rung_leaves_nothing_half_written(tiny_models, tmp_path, monkeypatch):
    recipe, run = _recipe(tmp_path, tiny_models), tmp_path / "run"
    import quantship.evaluate.run as ev

    real = ev.evaluate_models
    calls = {"n": 0}

    def interrupt_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_models", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_release(recipe, run, **QUIET)
    rungs = sorted((run / "rungs").iterdir())
    assert (rungs[0] / "gate.json").is_file()  # the first rung finished
    assert not (rungs[1] / "eval.json").exists() and not (rungs[1] / "gate.json").exists()
    assert not list(run.rglob("*.partial")) and not list(run.rglob("*.tmp"))
    assert not (run / "decision.json").exists()
    monkeypatch.setattr(ev, "evaluate_models", real)
    d = run_release(recipe, run, **QUIET)
    assert d["rungs"][0]["steps"] == {"quantize": "reused", "eval": "reused"}
    assert d["rungs"][1]["steps"] == {"quantize": "reused", "eval": "ran"} and d["chosen"]["name"] == "w8 rtn"


def test_no_passing_rung_names_the_closest_miss(tiny_models, tmp_path):
    recipe = _recipe(tmp_path, tiny_models, ladder="[{scheme: w2g32}, {scheme: w4g32}]", kld="1.0e-9")
    assert cli(["release", str(recipe), "-o", str(tmp_path / "run")]) == 1
    d = json.loads((tmp_path / "run" / "decision.json").read_text())
    assert d["chosen"] is None and d["closest_miss"]["name"] == "w4g32 rtn"  # smaller excess over the limit


@pytest.mark.parametrize("body, message", [
    ("budget: {kld_mean: 0.1}\n", "'model' is required"),
    ("model: m\n", "'budget' is required"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladers: []\n", "unknown key 'laders'; valid keys: model, budget"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladder: [{scheme: w9x}]\n", "ladder[0]"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladder: [{scheme: w8, method: nope}]\n", "ladder[0]"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladder: [{scheme: w8, bits: 3}]\n", "unknown key 'bits'"),
    ("model: m\nbudget: {kld_meen: 0.1}\n", "unknown key 'kld_meen'"),
    ("model: m\nbudget: missing.yaml\n", "does not exist"),
    ("model: m\nbudget: {kld_mean: 0.1}\neval: {windows: 2}\n", "eval: unknown key 'windows'"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladder: [{scheme: w4g64, overrides: {down_proj: w9}}]\n", "down_proj=w9"),
    ("model: m\nbudget: {kld_mean: 0.1}\nladder: [{search: {}}]\n", "search rung is not available"),
])
def test_bad_recipes_exit_2(tmp_path, capsys, body, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    assert cli(["release", str(recipe), "-o", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_default_ladder_and_the_search_rung(tmp_path, monkeypatch):
    import quantship.gate.release as rel

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nbudget: {kld_mean: 0.1}\ncalibration: {source: news, samples: 8, seqlen: 64}\n")
    monkeypatch.setattr(rel, "search_available", lambda: False)
    r = load_recipe(recipe)
    assert [x.name for x in r.ladder] == ["w8 rtn", "w4g64 gptq", "w4g64 awq+gptq"]
    assert r.ladder[2].spec.method == "awq" and r.ladder[2].spec.params["quantizer"] == "gptq"  # the alias, resolved
    assert r.ladder[0].spec.calib is None and r.ladder[1].spec.calib == "news" and r.ladder[1].spec.calib_samples == 8
    assert "not available" in r.notes[0]


# ----- reproduce ----------------------------------------------------------------------------------------
def test_reproduce_identical_then_different_then_refused(tiny_models, tmp_path, capsys):
    import quantship
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    art = quantship.quantize(str(src), "w4g32", method="gptq", calib="news", calib_samples=4, calib_seqlen=32,
                             out=tmp_path / "a", **QUIET)
    assert cli(["reproduce", str(art)]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    # a different artifact under the same manifest: re-seal after changing one tensor
    copy = tmp_path / "b"
    shutil.copytree(art, copy)
    state = load_file(str(copy / "model.safetensors"))
    name = next(k for k in state if k.endswith("scales"))
    state[name] = state[name] * 1.5
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    _reseal(copy)
    out = tmp_path / "r.json"
    assert cli(["reproduce", str(copy), "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert [d["name"] for d in r["differ"]] == [name] and r["differ"][0]["max_abs_diff"] > 0
    # the source changed: refused (exit 2) before any quantization
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    assert cli(["reproduce", str(art)]) == 2
    assert "not the model the artifact was made from" in capsys.readouterr().err
    shutil.rmtree(src)
    assert cli(["reproduce", str(art)]) == 2
    assert "not available" in capsys.readouterr().err


def _reseal(path: Path) -> None:
    from quantship.artifact import content_hash, manifest_digest
    from quantship.fsutil import canonical_json, sha256_file

    m = json.loads((path / "quantship.json").read_text())
    m["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    m["content_sha256"] = content_hash(m["files"])
    m["manifest_sha256"] = manifest_digest(m)
    (path / "quantship.json").write_text(canonical_json(m))


# ----- the report in a real browser ---------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def png_pixels(data: bytes) -> tuple[int, int, list[int]]:
    """(width, height, grey levels) of an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride, prev, grey = width * bpp, bytearray(width * bpp), []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        grey += [sum(line[x * bpp:x * bpp + 3]) // 3 for x in range(0, width, 4)] if y % 4 == 0 else []
        prev = line
    return width, height, grey


def render_in_chromium(html: Path, tmp_path: Path) -> tuple[bytes, str, str]:
    """(screenshot PNG, console/log output, DOM after scripts) of a page in headless Chromium."""
    exe = _chromium()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
              "--window-size=1100,2400"]
    shot = tmp_path / "shot.png"
    p = subprocess.run([*common, f"--screenshot={shot}", html.as_uri()], capture_output=True, text=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    return shot.read_bytes(), p.stderr + dom.stderr, dom.stdout


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                ".ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_models, tmp_path):
    recipe, run = _recipe(tmp_path, tiny_models), tmp_path / "run"
    run_release(recipe, run, **QUIET)
    assert cli(["report", str(run), "-o", str(tmp_path / "report.html")]) == 0
    html = tmp_path / "report.html"
    text = html.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # no network
    assert text.count("<svg") >= 3
    png, log, dom = render_in_chromium(html, tmp_path)
    assert console_errors(log) == [], log
    assert f'data-charts="{text.count("<svg")}"' in dom  # the page's script ran and saw every chart
    width, height, grey = png_pixels(png)
    mean = sum(grey) / len(grey)
    variance = sum((g - mean) ** 2 for g in grey) / len(grey)
    dark = sum(g < 128 for g in grey) / len(grey)
    assert width == 1100 and variance > 100 and dark > 0.005, (variance, dark)
    # the checks can fail: a page with a script error is caught, a blank page has no variance
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    png, log, _ = render_in_chromium(broken, tmp_path)
    assert console_errors(log)
    _, _, grey = png_pixels(png)
    assert max(grey) - min(grey) == 0


def test_reproduce_carries_per_layer_overrides(tiny_models, tmp_path):
    import quantship
    from quantship.gate.reproduce import quant_args, reproduce

    art = quantship.quantize(str(tiny_models["llama"]), "w4g32", overrides={"down_proj": "w8", r"layers\.0\.": "w2g32"},
                             out=tmp_path / "a", **QUIET)
    manifest = quantship.verify(art)
    assert quant_args(manifest)["overrides"] == (("down_proj", "w8"), (r"layers\.0\.", "w2g32"))
    r = reproduce(art, **QUIET)
    assert r["identical"] and r["tensors"] > 0 and r["settings"]["overrides"] == [["down_proj", "w8"], [r"layers\.0\.", "w2g32"]]
