"""Process memory: current and peak resident set size, and handing freed heap back to the OS."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import resource
import sys


def rss_bytes() -> int:
    """Resident set size now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child
    started by a big parent (a benchmark holding models) reports the parent's size as its own
    peak. ru_maxrss where /proc is missing (macOS: bytes, else KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _libc_call(name: str, *args) -> int | None:
    """libc's `name`(*args), or None where this C library lacks it (not glibc, not Linux)."""
    try:
        return getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so transients of a
    block-by-block pass would add up in RSS); a no-op where malloc_trim does not exist."""
    _libc_call("malloc_trim", 0)


class HeapTrimmer:
    """Calls release_free_memory once RSS has grown `slack_bytes` past its level after the last
    trim: a loop that frees large temporaries keeps its RSS near the live data without paying
    for a trim (and the page faults that follow it) on every iteration."""

    def __init__(self, slack_bytes: int = 128 * 2**20):
        self.slack = slack_bytes
        self.floor = rss_bytes()

    def __call__(self) -> None:
        if rss_bytes() > self.floor + self.slack:
            release_free_memory()
            self.floor = rss_bytes()


_MADV_DONTNEED = 4  # Linux: drop the pages; a private file mapping reads the file again on access


def release_tensor_memory(tensor) -> bool:
    """Hand back the resident pages of a CPU tensor that is about to be dropped, where they lie
    in a private file mapping (a memory-mapped checkpoint: every tensor of the file shares one
    mapping, so dropping one tensor keeps its pages resident). Heap memory is left to the
    allocator. The tensor must not be read afterwards. -> whether pages were handed back."""
    span = _mapped_page_span(tensor)
    return span is not None and _madvise_dontneed(*span)


def release_clean_pages(tensor) -> bool:
    """Like release_tensor_memory, but only when none of the tensor's pages was ever written
    (all still pages of the file): the tensor stays usable, its pages are read from the file
    again when touched. For weights needed again only much later (the embedding after the
    calibration inputs are captured). -> whether pages were handed back."""
    span = _mapped_page_span(tensor)
    return span is not None and _pages_unmodified(*span) and _madvise_dontneed(*span)


def _mapped_page_span(tensor) -> tuple[int, int] | None:
    """[lo, hi): the whole pages of a contiguous CPU tensor inside a private file mapping, or None."""
    if tensor.device.type != "cpu" or not tensor.numel() or not tensor.is_contiguous():
        return None
    page = resource.getpagesize()
    start = tensor.data_ptr()
    lo = -(-start // page) * page  # whole pages inside the tensor only
    hi = (start + tensor.numel() * tensor.element_size()) // page * page
    return (lo, hi) if hi > lo and _in_private_file_mapping(lo, hi) else None


def _madvise_dontneed(lo: int, hi: int) -> bool:
    return _libc_call("madvise", ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0


def _pages_unmodified(lo: int, hi: int) -> bool:
    """No resident page in [lo, hi) is a private anonymous copy (pagemap: bit 63 present, bit 61
    file page; a written page of a private file mapping is anonymous)."""
    import torch

    page = resource.getpagesize()
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            entries = torch.frombuffer(bytearray(f.read((hi - lo) // page * 8)), dtype=torch.int64)
    except (OSError, ValueError):
        return False
    present = entries < 0  # bit 63
    file_page = ((entries >> 61) & 1).bool()
    return not bool((present & ~file_page).any())


def _in_private_file_mapping(lo: int, hi: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                begin, end = (int(v, 16) for v in fields[0].split("-"))
                if begin <= lo and hi <= end:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return fields[1][3] == "p" and fields[4] != "0" and path.startswith("/")
    except (OSError, ValueError, IndexError):
        pass
    return False


_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own (dynamic) threshold tops out on 64-bit

# glibc has no call that reads the mmap threshold back, so quantship records what it set:
# None = never set by quantship (glibc's own dynamic threshold is in effect).
_mmap_threshold: int | None = None


def mmap_threshold_set() -> int | None:
    """The mmap threshold quantship last set in this process, or None (glibc's dynamic default)."""
    return _mmap_threshold


class large_allocations_mapped(contextlib.ContextDecorator):
    """Inside (a `with` block or a decorated function): every allocation of at least `threshold`
    bytes gets its own mapping, handed back to the OS when freed. glibc otherwise raises its mmap
    threshold after the first large free and serves later multi-MB tensors from the heap, where
    long-lived ones (calibration caches) pin the freed temporaries around them: block 0 of GPTQ on
    SmolLM2 peaked at 1036 MiB that way, 946 MiB with a 1 MiB threshold. A no-op without glibc.

    On exit the threshold in effect before is set again (nested blocks restore the outer value).
    glibc's dynamic adjustment cannot be switched back on once a threshold is set, so leaving the
    outermost block sets glibc's dynamic maximum: a process-wide change that lasts. Library code
    therefore enters this only where its caller asked for it (`reclaiming_memory(True)`: the
    CLI's one-shot quantize)."""

    def __init__(self, threshold: int = 2**20):
        self.threshold = threshold
        self._saved: list[int | None] = []

    def __enter__(self):
        self._saved.append(_mmap_threshold)
        self._set(self.threshold)
        return self

    def __exit__(self, *exc):
        previous = self._saved.pop()
        self._set(_GLIBC_MMAP_THRESHOLD_MAX if previous is None else previous)

    @staticmethod
    def _set(value: int) -> None:
        global _mmap_threshold
        _mmap_threshold = value
        _libc_call("mallopt", _M_MMAP_THRESHOLD, value)


# Whether the running quantization may hand memory back to the OS in ways that outlive it or
# that break the float model: madvise(DONTNEED) of the float weights' file pages and a fixed
# glibc mmap threshold. Set only through `reclaiming_memory` (a context, restored on exit).
_reclaim: contextvars.ContextVar[bool] = contextvars.ContextVar("quantship_reclaim_memory", default=False)


@contextlib.contextmanager
def reclaiming_memory(enabled: bool = True):
    """Inside: layer-by-layer calibration hands the float weights' pages of a memory-mapped
    checkpoint back to the OS once a block is quantized (the float model is unusable afterwards)
    and maps large allocations separately (see large_allocations_mapped). For one-shot processes
    (the CLI's quantize) that drop the float model anyway; off by default."""
    token = _reclaim.set(bool(enabled))
    try:
        yield
    finally:
        _reclaim.reset(token)


def reclaim_enabled() -> bool:
    return _reclaim.get()


def reclaim_context(threshold: int = 2**20):
    """large_allocations_mapped(threshold) where reclaiming is on, else a context that does nothing."""
    return large_allocations_mapped(threshold) if reclaim_enabled() else contextlib.nullcontext()
