"""Run untrusted Python (model-generated code) in a separate, confined process.

Never executed inside the quantship process. Layers, outermost first:

1. A child process `sys.executable -I -S` (isolated mode: no PYTHON* env vars, no user site,
   no site-packages) in a fresh temp dir as cwd, with a clean environment, stdin closed,
   stdout/stderr redirected to files in the temp dir, its own session / process group.
2. `preexec_fn` resource limits: RLIMIT_AS (address space, default 1 GiB), RLIMIT_CPU (CPU
   seconds backstop), RLIMIT_FSIZE (largest file it may write, 16 MiB), RLIMIT_CORE = 0.
3. Kernel isolation when the process may create namespaces (root here): a new network
   namespace (no interfaces: every connect fails with ENETUNREACH) and a new mount namespace
   in which every mount is remounted read-only except a bind mount of the temp dir. Writes
   outside the temp dir then fail with EROFS whatever Python does. Changes are private to
   the child's namespaces (propagation set to private first), never the host's.
4. A Python-level guard installed before the program runs, used always (and the only file /
   network layer where namespaces are unavailable): `open`/`io.open`/`os.open` and the os
   mutators (remove, rename, mkdir, chmod, ...) refuse paths outside the temp dir;
   `socket.socket` and friends raise; process spawning (`os.system`, `os.fork`, `os.exec*`,
   `subprocess`) raises; `ctypes` cannot be imported. A guard in the same interpreter is not
   a security boundary against deliberately hostile code; layers 1-3 are.
5. The parent enforces a wall-clock timeout and kills the whole process group (SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_FILE_BYTES = 16 * 2**20
TAIL_BYTES = 2000

# Runs first in the child (python -I -S -c LAUNCHER <program.py> <isolation>): confine, guard, run.
_LAUNCHER = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_PROGRAM, _ISOLATION = sys.argv[1], sys.argv[2]
_ns = "off"

def _namespaces():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        return "unavailable (errno %d)" % ctypes.get_errno()
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private")
    root = _ROOT.encode()
    if libc.mount(root, root, None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind temp dir")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in points:
        if mp != _ROOT:
            libc.mount(None, mp.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    os.chdir(_ROOT)  # the old cwd is the directory under the bind mount, now read-only
    return "on"

if _ISOLATION == "namespaces":
    _ns = _namespaces()

import builtins, io, shutil, socket, subprocess

def _inside(path):
    try:
        p = os.fspath(path)
    except TypeError:
        return True  # file descriptors: already opened
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    full = os.path.realpath(os.path.join(_ROOT, p))
    return full == _ROOT or full.startswith(_ROOT + os.sep)

def _deny(what, path=None):
    raise PermissionError("sandbox: %s%s is not allowed" % (what, "" if path is None else " of %r" % (path,)))

_real_open = io.open
def _open(file, mode="r", *a, **k):
    if isinstance(file, int) or ("w" not in mode and "a" not in mode and "x" not in mode and "+" not in mode):
        return _real_open(file, mode, *a, **k)
    if not _inside(file):
        _deny("writing outside the sandbox dir", file)
    return _real_open(file, mode, *a, **k)
builtins.open = io.open = _open

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_real_os_open = os.open
def _os_open(path, flags, *a, **k):
    if flags & _WRITE_FLAGS and not _inside(path):
        _deny("writing outside the sandbox dir", path)
    return _real_os_open(path, flags, *a, **k)
os.open = _os_open

def _path_guard(name, nargs=1):
    real = getattr(os, name)
    def guarded(*args, **kwargs):
        for p in args[:nargs]:
            if not _inside(p):
                _deny("os.%s outside the sandbox dir" % name, p)
        return real(*args, **kwargs)
    setattr(os, name, guarded)

for _n in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "removedirs", "chmod", "chown", "lchown",
           "truncate", "utime", "mkfifo", "mknod"):
    if hasattr(os, _n):
        _path_guard(_n)
for _n in ("rename", "replace", "link", "symlink"):
    _path_guard(_n, 2)
shutil.rmtree = lambda *a, **k: _deny("shutil.rmtree")

def _no_net(*a, **k):
    _deny("network access")
class _NoSocket:
    def __init__(self, *a, **k):
        _deny("network access")
socket.socket = socket.SocketType = _NoSocket
socket.create_connection = socket.create_server = socket.socketpair = socket.fromfd = _no_net
socket.getaddrinfo = socket.gethostbyname = _no_net

def _no_spawn(*a, **k):
    _deny("starting processes")
for _n in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe",
           "execvp", "execvpe", "spawnl", "spawnle", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
           "kill", "killpg"):
    if hasattr(os, _n):
        setattr(os, _n, _no_spawn)
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = _no_spawn
subprocess.check_output = subprocess.getoutput = subprocess.getstatusoutput = _no_spawn
for _m in ("ctypes", "_ctypes", "_socket", "_posixsubprocess", "multiprocessing"):
    sys.modules[_m] = None

sys.stderr.write("sandbox: namespaces=%s\n" % _ns)
sys.stderr.flush()
del _n, _m
import runpy
sys.argv = [_PROGRAM]
runpy.run_path(_PROGRAM, run_name="__main__")
'''


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None when killed by the wall-clock timeout
    timed_out: bool
    stdout: str  # tails, at most TAIL_BYTES each
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limits(memory_mb: int, cpu_s: int):
    def apply():  # runs in the child between fork and exec: resource calls only
        import resource

        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_python(source: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
               isolation: str = "namespaces") -> RunResult:
    """Run `source` as a Python program in the sandbox and report how it ended.

    isolation: "namespaces" (kernel network + read-only mounts when available, plus the
    Python guard) or "guard" (Python guard only; for testing the guard itself).
    """
    if isolation not in ("namespaces", "guard"):
        raise ValueError(f"isolation must be 'namespaces' or 'guard', got {isolation!r}")
    if timeout_s <= 0 or memory_mb < 64:
        raise ValueError(f"need timeout_s > 0 and memory_mb >= 64 (the interpreter alone needs ~30 MB); "
                         f"got timeout_s={timeout_s}, memory_mb={memory_mb}")
    tmp = tempfile.mkdtemp(prefix="quantship-sandbox-")
    try:
        program = os.path.join(tmp, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, program, isolation],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                start_new_session=True, preexec_fn=_limits(memory_mb, int(timeout_s) + 1),
            )
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
                _kill_group(proc)
        seconds = time.monotonic() - start
        return RunResult(returncode=rc, timed_out=timed_out, stdout=_tail(out_path), stderr=_tail(err_path),
                         seconds=seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
    except ProcessLookupError:
        pass
    proc.wait()
