"""Process memory probes."""

from __future__ import annotations

import subprocess
import sys

import torch

from quantship.memory import peak_rss_bytes, rss_bytes

CHILD = "from quantship.memory import peak_rss_bytes; print(peak_rss_bytes())"


def test_peak_rss_is_at_least_the_current_rss():
    assert peak_rss_bytes() >= rss_bytes() > 0


def test_a_child_process_does_not_inherit_its_parents_peak():
    # ru_maxrss survives fork + exec on Linux: a benchmark child would report this process's size
    ballast = torch.ones(384 * 2**20 // 4)  # 384 MiB, touched
    parent = rss_bytes()
    child = int(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert child < parent - 256 * 2**20, (child, parent)
    del ballast
