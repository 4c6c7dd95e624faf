"""Facts about the machine a benchmark ran on, and its measured memory read bandwidth."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    cores: int  # usable by this process (affinity)
    flags: dict[str, bool] = field(hash=False)
    memory_bytes: int = 0
    bandwidth_gbs: float | None = None  # measured read bandwidth, GB/s (1e9)
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # `uptime` load when recorded

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, dict[str, bool]]:
    """(CPU model name, {flag: present}) from /proc/cpuinfo; ('unknown', all False) where it is absent."""
    model, flags = "unknown", set()
    try:
        text = Path(path).read_text()
    except OSError:
        return model, {f: False for f in FLAGS_OF_INTEREST}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, {f: f in flags for f in FLAGS_OF_INTEREST}


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def measure_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: median over `repeats` of summing a float32 tensor of `size_bytes`
    (one warm-up pass first, so page faults of the first touch are not timed)."""
    import torch

    if size_bytes < 4 or repeats < 1:
        raise ValueError(f"need size_bytes >= 4 and repeats >= 1, got {size_bytes}, {repeats}")
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    del x
    return (size_bytes // 4) * 4 / statistics.median(times) / 1e9


def machine_info(*, measure: bool = True, size_bytes: int = 1 << 30, repeats: int = 5) -> MachineInfo:
    model, flags = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bw = measure_bandwidth(size_bytes, repeats) if measure else None
    return MachineInfo(cpu_model=model, cores=cores, flags=flags, memory_bytes=_total_memory(),
                       bandwidth_gbs=bw, loadavg=tuple(round(v, 2) for v in os.getloadavg()))
