"""Signed artifacts and exports: OpenSSF model-signing with an offline elliptic-curve key.

`sign(folder, private_key)` writes `quantship.sig` into the folder: a Sigstore bundle whose DSSE
envelope carries an in-toto statement listing every other file of the folder with its sha256,
signed with the private key (no network, no transparency log). `verify_signature(folder,
public_key)` re-hashes every file and checks the statement and its signature; a changed, missing
or added file fails naming the file. Digests (quantship.json) detect change; the signature ties
the folder to whoever holds the key.

Keys are ordinary PEM EC keys (NIST P-256/P-384), e.g.:
    openssl ecparam -name prime256v1 -genkey -noout -out key.priv
    openssl ec -in key.priv -pubout -out key.pub
"""

from __future__ import annotations

import re
from pathlib import Path

SIGNATURE = "quantship.sig"


class SignatureError(ValueError):
    """The folder is unsigned, or its signature does not verify with the given key."""


def _model_signing():
    try:
        import model_signing
    except ImportError as e:
        raise SignatureError(f"signing needs the 'model-signing' package ({e}); install the pinned version with "
                             f"`pip install -e '.[export]'`") from None
    return model_signing


def _hashing(ms):
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE])


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise SignatureError(f"{folder} is not a folder; sign and verify take an artifact or export folder")
    if not ((folder / "quantship.json").is_file() or (folder / "quantship-export.json").is_file()):
        raise SignatureError(f"{folder} is neither a quantship artifact nor an export (no quantship.json or "
                             f"quantship-export.json)")


def sign(folder: str | Path, private_key: str | Path, *, password: str | None = None) -> Path:
    """Check the folder's own digests, then sign every file in it; returns the signature's path.

    The signature is written beside the files atomically (a temporary file renamed into place)."""
    import os
    import tempfile

    folder, private_key = Path(folder), Path(private_key)
    _check_folder(folder)
    verify_digests(folder)  # never sign something that is already damaged
    if not private_key.is_file():
        raise SignatureError(f"private key {private_key} does not exist")
    ms = _model_signing()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.sign.") as tmp:
        staged = Path(tmp) / SIGNATURE
        try:
            (ms.signing.Config().set_hashing_config(_hashing(ms))
             .use_elliptic_key_signer(private_key=private_key, password=password).sign(folder, staged))
        except (ValueError, TypeError) as e:
            raise SignatureError(f"cannot sign with {private_key}: {_first_line(e)} (expected a PEM elliptic-curve "
                                 f"private key)") from None
        os.chmod(staged, 0o644 & ~_umask())
        os.replace(staged, folder / SIGNATURE)
    return folder / SIGNATURE


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def verify_signature(folder: str | Path, public_key: str | Path) -> None:
    """Raise SignatureError unless `folder` carries a signature by `public_key` over exactly its files."""
    folder, public_key = Path(folder), Path(public_key)
    _check_folder(folder)
    signature = folder / SIGNATURE
    if not signature.is_file():
        raise SignatureError(f"{folder} is not signed (no {SIGNATURE}); sign it with `quantship sign {folder} "
                             f"--key KEY.priv` or use a signed copy")
    if not public_key.is_file():
        raise SignatureError(f"public key {public_key} does not exist")
    ms = _model_signing()
    try:
        ms.verifying.Config().set_hashing_config(_hashing(ms)).use_elliptic_key_verifier(
            public_key=public_key).verify(folder, signature)
    except Exception as e:  # model-signing raises ValueError, cryptography's InvalidSignature, JSON and proto errors
        raise SignatureError(f"{folder} failed signature verification with {public_key}: {_describe(e)}") from None


def _describe(e: Exception) -> str:
    text = str(e)
    # model-signing's message is str() of a list of strings, so quotes may come escaped (\\')
    files = re.findall(r"Hash mismatch for \\?'([^'\\]+)", text)
    if files:
        return f"changed after signing: {', '.join(files)}"
    for pattern, what in ((r"Extra files found in model \\?'[^']*\\?': ([\w./ ,+-]+)", "added after signing"),
                          (r"Missing files in model \\?'[^']*\\?': ([\w./ ,+-]+)", "missing since signing")):
        m = re.search(pattern, text)
        if m:
            return f"{what}: {m.group(1).strip()}"
    if type(e).__name__ == "InvalidSignature" or "signature" in text.lower():
        return "the signature does not match this key (signed by another key, or the signature file was edited)"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def verify_digests(folder: Path) -> None:
    """The folder's own digests: an artifact's quantship.json, or an export's quantship-export.json."""
    from .artifact import ArtifactError, verify_artifact

    if (folder / "quantship.json").is_file():
        try:
            verify_artifact(folder)
        except ArtifactError as e:
            raise SignatureError(str(e)) from None
        return
    from .export.base import ExportError, verify_export

    try:
        verify_export(folder)
    except ExportError as e:
        raise SignatureError(str(e)) from None
