"""Files: sha256 digests and atomic writes (a crash or Ctrl-C never leaves half an output)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_tree(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file below root, keyed by its relative POSIX path, sorted."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files
            if p.relative_to(root).as_posix() not in exclude}


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _public_mode(folder: bool = False) -> int:
    """The mode an ordinary new file (or folder) gets under the process umask: 0644 (0755) under 022.

    mkstemp/mkdtemp create private (0600/0700) entries; an artifact copied to a serving user must be
    readable like any other file, so everything we write is given the ordinary mode."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def make_public(root: str | Path) -> None:
    """Give every file below `root` the ordinary file mode and every folder the ordinary folder mode."""
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, _public_mode(folder=p.is_dir()))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _public_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, canonical_json(obj))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove temporary folders of earlier writes of `target` whose writer died (SIGKILL, power loss).

    Their names carry the writer's pid (`.NAME.PID.*.partial`); a live writer's folder is kept."""
    target = Path(target).absolute()
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        pid = p.name[len(target.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and target.exists():  # a replace finished its swap but died before deleting the old copy
        shutil.rmtree(old, ignore_errors=True)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and an
    existing `target` is left untouched. A writer killed outright (SIGKILL) leaves only a hidden
    `.NAME.PID.*.partial` folder, never anything under `target`'s name; the next write removes it.
    Callers decide whether an existing target may be replaced (see artifact.check_replaceable).
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --force) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        make_public(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_location(target: str | Path, need_bytes: int) -> None:
    """Before any long work: `target` can be created (or replaced) and its file system has room.

    Raises NotADirectoryError / PermissionError / OSError naming the path that is in the way."""
    target = Path(target).expanduser().absolute()
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create {target}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantship-probe.", dir=ancestor)
    except OSError as e:
        raise PermissionError(f"cannot write the output {target}: {ancestor} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    free = shutil.disk_usage(ancestor).free
    if free < need_bytes:
        raise OSError(f"not enough free space for {target}: {ancestor} has {free / 2**20:.0f} MiB free, "
                      f"the output needs about {need_bytes / 2**20:.0f} MiB")


def is_empty_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())
