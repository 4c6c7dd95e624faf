"""Fuzzing artifacts: byte flips and truncation of every file, edits of every manifest field, files
added and removed. Each mutated artifact is refused by verify and load with a one-line ArtifactError,
or (a mutation that changes nothing) loads and computes exactly the original logits. Never another
exception, never a silently different model.

QUANTSHIP_FUZZ_EXAMPLES raises the number of cases (the suite runs a few hundred);
QUANTSHIP_FUZZ_REPORT=FILE writes the outcome counts there as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantship
from quantship.artifact import ArtifactError, load_artifact, manifest_digest, verify_artifact

EXAMPLES = int(os.environ.get("QUANTSHIP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])
OUTCOMES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    if os.environ.get("QUANTSHIP_FUZZ_REPORT"):
        Path(os.environ["QUANTSHIP_FUZZ_REPORT"]).write_text(json.dumps(OUTCOMES, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def original(tiny_models, tmp_path_factory):
    path = quantship.quantize(str(tiny_models["llama"]), "w4g32-asym", out=tmp_path_factory.mktemp("f") / "art",
                              progress=False, log=lambda *a, **k: None)
    model, _ = load_artifact(path)
    with torch.inference_mode():
        logits = model(PROMPT).logits
    return path, logits


def _fresh_copy(path: Path, scratch: Path) -> Path:
    target = scratch / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(path, target)
    return target


def _outcome(path: Path, expected_logits: torch.Tensor, *, verify: bool = True) -> str:
    """'refused' or 'same'; anything else fails the test."""
    try:
        if verify:
            verify_artifact(path)
        model, _ = load_artifact(path, verify=verify)
    except ArtifactError as e:
        assert "\n" not in str(e), f"multi-line error: {e}"
        return _count("refused")
    with torch.inference_mode():
        logits = model(PROMPT).logits
    assert torch.equal(logits, expected_logits), "a mutated artifact loaded and computes something else"
    return _count("same")


def _count(outcome: str, kind: str = "hashed") -> str:
    OUTCOMES[f"{kind}:{outcome}"] = OUTCOMES.get(f"{kind}:{outcome}", 0) + 1
    return outcome


def _parsed_manifest(path: Path):
    try:
        return json.loads((path / "quantship.json").read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


FILES = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "quantship.json"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _flip(file: Path, offset_frac: float, xor: int, header_only: bool) -> None:
    data = bytearray(file.read_bytes())
    span = len(data)
    if header_only and file.suffix == ".safetensors":
        span = 8 + int.from_bytes(data[:8], "little")
    data[int(offset_frac * (span - 1))] ^= xor
    file.write_bytes(bytes(data))


@FUZZ
@given(file=st.sampled_from(FILES), frac=st.floats(0, 1), xor=st.integers(1, 255), header=st.booleans())
def test_byte_flips_are_refused(original, tmp_path, file, frac, xor, header):
    path = _fresh_copy(original[0], tmp_path)
    before = _parsed_manifest(path)
    _flip(path / file, frac, xor, header)
    # the manifest's digest is over its canonical JSON: a flip that turns whitespace into other
    # whitespace changes no field and is accepted
    unchanged = file == "quantship.json" and _parsed_manifest(path) == before
    assert _outcome(path, original[1]) == ("same" if unchanged else "refused")


@FUZZ
@given(file=st.sampled_from(FILES), frac=st.floats(0, 0.999))
def test_truncation_is_refused(original, tmp_path, file, frac):
    path = _fresh_copy(original[0], tmp_path)
    target = path / file
    target.write_bytes(target.read_bytes()[: int(frac * target.stat().st_size)])
    assert _outcome(path, original[1]) == "refused"


def _field_paths(obj, prefix=()):
    """Every key path of the manifest (nested objects and lists), the root's fields included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _field_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _field_paths(v, prefix + (i,))


def _edit(manifest: dict, path: tuple, value, delete: bool) -> None:
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@FUZZ
@given(data=st.data(), value=JSON_VALUES, delete=st.booleans(), reseal=st.booleans())
def test_manifest_field_edits_are_refused_or_change_nothing(original, tmp_path, data, value, delete, reseal):
    """Without reseal the manifest digest refuses every real edit. With reseal (a forger recomputes the
    digest: signatures, not hashes, catch that) loading must still never fail with anything but a
    one-line ArtifactError: fields are cross-checked against the config and the tensors."""
    path = _fresh_copy(original[0], tmp_path)
    manifest = json.loads((path / "quantship.json").read_text())
    fields = sorted(_field_paths(manifest), key=repr)
    field = data.draw(st.sampled_from(fields))
    before = json.dumps(manifest, sort_keys=True)
    _edit(manifest, field, value, delete)
    changed = json.dumps(manifest, sort_keys=True) != before
    if reseal and isinstance(manifest, dict):
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "quantship.json").write_text(json.dumps(manifest))
    if not reseal:
        assert _outcome(path, original[1]) == ("refused" if changed else "same")
        return
    try:
        verify_artifact(path)
        load_artifact(path)
    except ArtifactError as e:
        assert "\n" not in str(e)
        _count("refused", "resealed")
    else:
        _count("loaded", "resealed")


@FUZZ
@given(action=st.sampled_from(["add", "remove", "add_dir"]), file=st.sampled_from(FILES[:-1]),
       name=st.text(alphabet="abcxyz._-", min_size=1, max_size=8).filter(lambda n: n not in (".", "..")))
def test_added_and_removed_files_are_refused(original, tmp_path, action, file, name):
    path = _fresh_copy(original[0], tmp_path)
    if action == "remove":
        (path / file).unlink()
    elif action == "add":
        target = path / f"extra-{name}"
        target.write_bytes(b"\x00payload")
    else:
        (path / f"sub-{name}").mkdir()
        (path / f"sub-{name}" / "x.bin").write_bytes(b"1")
    assert _outcome(path, original[1]) == "refused"
