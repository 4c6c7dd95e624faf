"""One OpenMP thread for loops of many small tensor ops (the GPTQ column loop, HQQ's elementwise
rounds): fanning each tiny op out to threads costs more than it buys on the 2-core machine
(GPTQ, 960x576 weight: 0.28 s on 1 thread vs 1.65 s on 2; HQQ, 576x1536 w4g64-asym: ~1.0 s on 1
thread vs 4-12 s on 2, both measured while the machine was busy)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
