"""A non-editable install ships what the package needs at run time: a wheel built from the tree,
installed into a fresh venv, compiles and loads the native kernels from its own copy of the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = sorted(p.name for p in (ROOT / "src" / "quantship" / "native" / "csrc").iterdir() if p.suffix in (".cpp", ".h"))


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy, so the build's scratch folders never land in (or race with) the working tree
    src = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)])
    (whl,) = out.glob("quantship-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_ships_the_native_sources_and_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert CSRC and {f"quantship/native/csrc/{n}" for n in CSRC} <= names, sorted(n for n in names if "native" in n)
    for data in ("quantship/evaluate/data/math.jsonl", "quantship/evaluate/harness_tasks/quantship_mc.yaml",
                 "quantship/bench/configs/llama-3.1-8b.json"):
        assert data in names


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_builds_the_native_kernels(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Install the wheel alone (no dependencies, no index): pip runs against the fresh interpreter,
    # which at this point sees nothing of this environment, so nothing here can be touched.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies (torch, transformers, ninja ...) come from this environment's site-packages, added
    # after the venv's own: a path line in a .pth does not run that folder's .pth files, so this
    # environment's editable quantship stays invisible and the installed copy is the one imported.
    (site / "zz_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUANTSHIP_NATIVE")}
    env["QUANTSHIP_HOME"] = str(tmp_path / "home")  # a fresh build from the installed sources, no cached one
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the ninja wheel's binary
    where = _run([str(python), "-c", "import quantship.native as n; print(n.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    out = _run([str(python), "-m", "quantship.native"], env=env, cwd=tmp_path, timeout=900)
    assert out.stdout.strip() == "quantship native kernels: built and loaded", out.stdout + out.stderr
    assert list((tmp_path / "home" / "native").glob("*/quantship_native.so"))
