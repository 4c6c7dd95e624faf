"""Signed artifacts: quantship sign / verify --key with OpenSSF model-signing (offline EC key); loading
with a required signature refuses an unsigned, tampered or foreign-signed artifact, naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import quantship
from quantship.artifact import ArtifactError, load_artifact
from quantship.cli import main as cli
from quantship.signing import SIGNATURE, SignatureError, sign, verify_signature

pytest.importorskip("model_signing")
QUIET = dict(progress=False, log=lambda *a, **k: None)


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.priv", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {"ours": _keypair(root, "ours"), "theirs": _keypair(root, "theirs")}


@pytest.fixture(scope="module")
def signed_source(tiny_models, tmp_path_factory, keys):
    out = quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path_factory.mktemp("s") / "a", **QUIET)
    sign(out, keys["ours"][0])
    return out


@pytest.fixture
def signed(signed_source, tmp_path):
    copy = tmp_path / "signed"
    shutil.copytree(signed_source, copy)
    return copy


def test_sign_then_verify_and_load(signed, keys, capsys):
    assert (signed / SIGNATURE).is_file()
    assert cli(["verify", str(signed)]) == 0  # the digests still verify beside the signature
    assert cli(["verify", str(signed), "--key", str(keys["ours"][1])]) == 0
    assert "signature" in capsys.readouterr().out
    model, _ = load_artifact(signed, public_key=keys["ours"][1])
    assert model is not None


def test_a_changed_byte_fails_naming_the_file(signed, keys, capsys):
    # a forger who re-seals the manifest digests passes `verify` without a key, but not the signature
    import json

    from quantship.artifact import content_hash, manifest_digest
    from quantship.fsutil import sha256_file

    tok = signed / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("<|eos|>", "<|EOS|>"))
    manifest = json.loads((signed / "quantship.json").read_text())
    manifest["files"]["tokenizer_config.json"] = sha256_file(tok)
    manifest["content_sha256"] = content_hash(manifest["files"])
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (signed / "quantship.json").write_text(json.dumps(manifest))
    assert cli(["verify", str(signed)]) == 0
    assert cli(["verify", str(signed), "--key", str(keys["ours"][1])]) == 1
    err = capsys.readouterr().err
    assert "tokenizer_config.json" in err and "changed after signing" in err
    with pytest.raises(ArtifactError, match="tokenizer_config.json"):
        load_artifact(signed, public_key=keys["ours"][1])


def test_unsigned_and_foreign_signed_are_refused(tiny_models, signed, keys, tmp_path, capsys):
    with pytest.raises(SignatureError, match="another key|does not match"):
        verify_signature(signed, keys["theirs"][1])
    (signed / SIGNATURE).unlink()
    with pytest.raises(ArtifactError, match="not signed"):
        load_artifact(signed, public_key=keys["ours"][1])
    # the CLI's loading paths: eval's candidates and export's source
    assert cli(["eval", str(tiny_models["llama"]), str(signed), "--require-signature", str(keys["ours"][1]),
                "--max-windows", "1", "--ctx", "16"]) == 1
    assert "not signed" in capsys.readouterr().err
    assert cli(["export", str(signed), "--to", "gptq", "-o", str(tmp_path / "g"),
                "--require-signature", str(keys["ours"][1])]) == 1
    assert "not signed" in capsys.readouterr().err and not (tmp_path / "g").exists()
    assert cli(["eval", str(tiny_models["llama"]), str(tiny_models["llama"]), "--require-signature",
                str(keys["ours"][1]), "--max-windows", "1", "--ctx", "16"]) == 1
    assert "neither a quantship artifact" in capsys.readouterr().err  # checked before any model loads


def test_signed_export_verifies_the_same_way(signed, keys, tmp_path, capsys):
    from quantship.export import export

    out = export(signed, "gptq", tmp_path / "gptq", log=lambda *a: None, public_key=keys["ours"][1])
    assert cli(["sign", str(out), "--key", str(keys["ours"][0])]) == 0
    assert cli(["verify", str(out), "--key", str(keys["ours"][1])]) == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(data))
    assert cli(["verify", str(out), "--key", str(keys["ours"][1])]) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_sign_refuses_a_damaged_folder_and_a_bad_key(signed, keys, tmp_path):
    (signed / "tokenizer.json").write_text("{}")
    with pytest.raises(SignatureError, match="tokenizer.json"):
        sign(signed, keys["ours"][0])
    not_a_key = tmp_path / "k.priv"
    not_a_key.write_text("hello")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SignatureError, match="neither a quantship artifact"):
        sign(other, not_a_key)
