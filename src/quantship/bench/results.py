"""Typed benchmark results: frozen dataclasses with exact JSON round trips.

`BenchReport.to_json()` is the flat dict `quantship bench --json` writes (keys in docs/bench.md):
the fields every mode has, plus those of the single-stream (`SingleStreamStats`) or load
(`LoadStats`) mode. `BenchReport.from_json(r.to_json()) == r` and `to_json(from_json(d)) == d`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..specs import BenchSpec


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Percentiles:
    mean: float | None
    median: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class SingleStreamStats:
    """One request at a time, warm-up excluded, medians of `repeats` (bench/single.py)."""

    prompt_tokens: int
    output_tokens: int
    repeats: int
    warmup: int
    ttft_s: float
    prefill_tok_s: float
    tpot_s: float
    decode_tok_s: float
    ttft_runs_s: tuple[float, ...]
    tpot_runs_s: tuple[float, ...]
    bytes_per_decoded_token: float

    def to_json(self) -> dict:
        return {**asdict(self), "ttft_runs_s": list(self.ttft_runs_s), "tpot_runs_s": list(self.tpot_runs_s)}

    @classmethod
    def from_json(cls, data: dict) -> SingleStreamStats:
        return cls(**{**data, "ttft_runs_s": tuple(data["ttft_runs_s"]), "tpot_runs_s": tuple(data["tpot_runs_s"])})


@dataclass(frozen=True)
class LoadStats:
    """Closed- or open-loop load: the `vllm bench serve` summary plus engine step counters."""

    completed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_tok_s: float
    total_tok_s: float
    ttft_s: Percentiles
    tpot_s: Percentiles
    itl_s: Percentiles
    e2e_s: Percentiles
    slo: dict[str, float]
    goodput: float | None
    slo_attainment: float | None
    concurrency: int | None
    request_rate: float | None
    prefill_tok_s: float | None
    decode_tok_s: float | None
    decode_steps: int
    mean_decode_batch: float

    _LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s")

    def to_json(self) -> dict:
        return {**asdict(self), "slo": dict(self.slo)}

    @classmethod
    def from_json(cls, data: dict) -> LoadStats:
        return cls(**{**data, **{k: Percentiles(**data[k]) for k in cls._LATENCIES}, "slo": dict(data["slo"])})


@dataclass(frozen=True)
class BenchModel:
    """The model measured: its folder, whether it is an artifact, its scheme and sha256
    (models/digest.py: an artifact's content_sha256, else the digest of the folder's files)."""

    path: str
    artifact: bool
    scheme: str | None
    sha256: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class BenchReport:
    mode: str  # "single", "concurrency" or "request_rate"
    spec: BenchSpec
    model: BenchModel
    load_s: float
    weight_bytes: int
    kv_bytes_per_token: float
    bandwidth_gbs: float | None  # achieved: bytes read per decode step x steps / s
    measured_bandwidth_gbs: float | None  # the machine's read bandwidth
    bandwidth_fraction: float | None
    peak_rss_bytes: int
    cost_per_million_output_tokens: float | None
    machine: dict
    versions: dict
    kernels: dict[str, str]
    fused_groups: int
    decode_path: str
    decode_note: str | None = None  # why the native decode does not run, when it does not
    single: SingleStreamStats | None = None
    load: LoadStats | None = None

    def __post_init__(self) -> None:
        if (self.mode == "single") != (self.single is not None) or (self.mode != "single") != (self.load is not None):
            raise ValueError(f"a {self.mode!r} bench report needs exactly the "
                             f"{'single-stream' if self.mode == 'single' else 'load'} statistics")

    @property
    def decode_tok_s(self) -> float | None:
        return self.single.decode_tok_s if self.single is not None else self.load.decode_tok_s

    @property
    def throughput_tok_s(self) -> float:
        """Output tokens/s the cost is computed from: decode tok/s (single) or output tok/s (load)."""
        return self.single.decode_tok_s if self.single is not None else self.load.output_tok_s

    _COMMON = ("mode", "load_s", "weight_bytes", "kv_bytes_per_token", "bandwidth_gbs", "measured_bandwidth_gbs",
               "bandwidth_fraction", "peak_rss_bytes", "cost_per_million_output_tokens", "machine", "versions",
               "kernels", "fused_groups", "decode_path", "decode_note")

    def to_json(self) -> dict:
        stats = self.single if self.single is not None else self.load
        out = {**stats.to_json()}
        out.update({k: getattr(self, k) for k in self._COMMON})
        out["machine"], out["versions"], out["kernels"] = dict(self.machine), dict(self.versions), dict(self.kernels)
        out["model"] = asdict(self.model)
        out["spec"] = asdict(self.spec)
        return out

    @classmethod
    def from_json(cls, data: dict) -> BenchReport:
        stats_cls = SingleStreamStats if data["mode"] == "single" else LoadStats
        known = {*cls._COMMON, "model", "spec", *_field_names(stats_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BenchReport ({data['mode']}): unknown keys {unknown}")
        stats = stats_cls.from_json({k: data[k] for k in _field_names(stats_cls)})
        return cls(**{k: data.get(k) for k in cls._COMMON}, spec=BenchSpec(**data["spec"]),
                   model=BenchModel(**data["model"]),
                   single=stats if data["mode"] == "single" else None, load=None if data["mode"] == "single" else stats)
