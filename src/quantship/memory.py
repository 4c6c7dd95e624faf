"""Process memory: current and peak resident set size, and handing freed heap back to the OS."""

from __future__ import annotations

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


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so transients of a
    block-by-block pass would add up in RSS); a no-op where malloc_trim does not exist."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
