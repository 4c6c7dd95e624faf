"""Typed evaluation results: frozen dataclasses with exact JSON round trips.

An `EvalReport` carries the statistics of one candidate against its baseline, the settings they
were measured with, and the sha256 of both models and of the evaluation data, so a quality gate
can check that a report belongs to the models it judges (`EvalReport.matches`).

JSON (what `quantship eval --json` writes for one candidate; keys in docs/evaluation.md):

    {"baseline": name, "candidate": name, "tokens", "ppl", "kld", "top1_agreement", "ece", "delta_p",
     "texts": {text: {...the same statistics...}}, "settings": {...}, "tasks": {...} (with suites),
     "models": {"baseline": ModelRef, "candidate": ModelRef}, "data_sha256": "..."}

`from_json(r.to_json()) == r` and `to_json(from_json(d)) == d` hold exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


def _plain(cls, data: dict):
    """A flat dataclass of scalars from its JSON dict; unknown or missing keys are an error."""
    names = [f.name for f in fields(cls)]
    if set(data) != set(names):
        raise ValueError(f"{cls.__name__}: expected keys {names}, got {sorted(data)}")
    return cls(**data)


@dataclass(frozen=True)
class PplStats:
    baseline: float
    candidate: float
    ln_ratio: float  # mean over scored tokens of nll_cand - nll_base = ln(PPL_cand / PPL_base)
    ln_ratio_stderr: float


@dataclass(frozen=True)
class KLDStats:
    """Per scored token KL(P_base || P_cand) over the vocabulary (llama.cpp's statistics)."""

    mean: float
    stderr: float
    median: float
    p90: float
    p99: float
    p99_9: float
    max: float


@dataclass(frozen=True)
class ECEStats:
    baseline: float
    candidate: float


@dataclass(frozen=True)
class DeltaPStats:
    """Δp = p_cand(correct) - p_base(correct) per scored token."""

    mean: float
    rms: float
    p1: float
    p5: float
    median: float
    p95: float
    p99: float


@dataclass(frozen=True)
class TokenScores:
    """The statistics of one text (or of all texts pooled)."""

    tokens: int
    ppl: PplStats
    kld: KLDStats
    top1_agreement: float
    ece: ECEStats
    delta_p: DeltaPStats

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "ppl": asdict(self.ppl), "kld": asdict(self.kld),
                "top1_agreement": self.top1_agreement, "ece": asdict(self.ece), "delta_p": asdict(self.delta_p)}

    @classmethod
    def from_json(cls, data: dict) -> TokenScores:
        return cls(tokens=data["tokens"], ppl=_plain(PplStats, data["ppl"]), kld=_plain(KLDStats, data["kld"]),
                   top1_agreement=data["top1_agreement"], ece=_plain(ECEStats, data["ece"]),
                   delta_p=_plain(DeltaPStats, data["delta_p"]))


@dataclass(frozen=True)
class EvalSettings:
    ctx: int
    max_windows: int
    batch_size: int
    texts: tuple[str, ...]
    scored: str = "second half of each window"

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "max_windows": self.max_windows, "batch_size": self.batch_size,
                "texts": list(self.texts), "scored": self.scored}

    @classmethod
    def from_json(cls, data: dict) -> EvalSettings:
        return _plain(cls, {**data, "texts": tuple(data["texts"])})


@dataclass(frozen=True)
class ModelRef:
    """Which model was measured. sha256: an artifact's manifest content_sha256; a folder's digest
    of its files' sha256 (built-ins: the file hashes recorded at pull time); an in-memory model's
    digest of its state dict. `digest` says which of these it is."""

    name: str
    sha256: str | None
    digest: str  # "artifact", "files" or "state_dict"
    path: str | None = None
    bits_per_weight: float | None = None  # quantized layers (artifacts)
    size_bytes: int | None = None  # weight file(s) on disk

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelRef:
        return _plain(cls, data)


@dataclass(frozen=True)
class SuiteResult:
    """One generation suite on both models, paired (evaluate/tasks.py)."""

    baseline: float
    candidate: float
    delta: float
    ci95: tuple[float, float]
    p_value: float
    significant: bool
    flips: dict[str, int]  # {"pass_to_fail": n, "fail_to_pass": n}
    n: int
    content_hash: str
    worst_flips: tuple[dict, ...] = ()
    refusal_rate: dict[str, float] | None = None  # refusal suite: {"baseline": r, "candidate": r}
    behaviour_agreement: float | None = None  # refusal suite

    def to_json(self) -> dict:
        out = {**asdict(self), "ci95": list(self.ci95), "worst_flips": [dict(f) for f in self.worst_flips]}
        for key in ("refusal_rate", "behaviour_agreement"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: dict) -> SuiteResult:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SuiteResult: unknown keys {unknown}")
        return cls(**{**data, "ci95": tuple(data["ci95"]), "worst_flips": tuple(data.get("worst_flips", ()))})


@dataclass(frozen=True)
class SliceResult:
    """A scoring suite (multilingual): per-slice scores of both models."""

    slices: dict[str, dict[str, Any]]
    n: int
    content_hash: str

    def to_json(self) -> dict:
        return {"slices": {k: dict(v) for k, v in self.slices.items()}, "n": self.n, "content_hash": self.content_hash}

    @classmethod
    def from_json(cls, data: dict) -> SliceResult:
        return _plain(cls, data)


@dataclass(frozen=True)
class TaskResults:
    """Task suites by name; content_sha256 hashes every suite's content_hash (the items and outputs)."""

    suites: dict[str, SuiteResult | SliceResult]
    content_sha256: str

    @classmethod
    def from_suites(cls, results: dict[str, dict]) -> TaskResults:
        """From run_suites' dict; content_sha256 over the per-suite content hashes."""
        from ..fsutil import canonical_json, sha256_bytes

        hashes = {name: r.get("content_hash") for name, r in results.items()}
        return cls.from_json({**results, "content_sha256": sha256_bytes(canonical_json(hashes).encode())})

    def to_json(self) -> dict:
        return {**{name: r.to_json() for name, r in self.suites.items()}, "content_sha256": self.content_sha256}

    @classmethod
    def from_json(cls, data: dict) -> TaskResults:
        suites = {name: (SliceResult if "slices" in r else SuiteResult).from_json(r)
                  for name, r in data.items() if name != "content_sha256"}
        return cls(suites=suites, content_sha256=data["content_sha256"])

    def as_dict(self) -> dict[str, dict]:
        """The per-suite dicts run_suites returns (for render_tables)."""
        return {name: r.to_json() for name, r in self.suites.items()}


@dataclass(frozen=True)
class EvalReport:
    """One candidate against its baseline on the same windows."""

    overall: TokenScores
    texts: dict[str, TokenScores]
    settings: EvalSettings
    baseline: ModelRef
    candidate: ModelRef
    data_sha256: str  # the evaluation texts and window settings (evaluate.run.eval_data_sha256)
    tasks: TaskResults | None = None

    # the pooled statistics, as attributes of the report itself
    @property
    def tokens(self) -> int:
        return self.overall.tokens

    @property
    def ppl(self) -> PplStats:
        return self.overall.ppl

    @property
    def kld(self) -> KLDStats:
        return self.overall.kld

    @property
    def top1_agreement(self) -> float:
        return self.overall.top1_agreement

    @property
    def ece(self) -> ECEStats:
        return self.overall.ece

    @property
    def delta_p(self) -> DeltaPStats:
        return self.overall.delta_p

    def matches(self, baseline_sha256: str, candidate_sha256: str, data_sha256: str | None = None) -> bool:
        """Whether this report measured these models (and, if given, this evaluation data)."""
        return (self.baseline.sha256 == baseline_sha256 and self.candidate.sha256 == candidate_sha256
                and (data_sha256 is None or self.data_sha256 == data_sha256))

    def renamed(self, name: str) -> EvalReport:
        """The same report with the candidate shown under another name (the demo's "w8 rtn")."""
        from dataclasses import replace

        return replace(self, candidate=replace(self.candidate, name=name))

    def to_json(self) -> dict:
        out = {"baseline": self.baseline.name, "candidate": self.candidate.name, **self.overall.to_json(),
               "texts": {name: t.to_json() for name, t in self.texts.items()}, "settings": self.settings.to_json()}
        if self.tasks is not None:
            out["tasks"] = self.tasks.to_json()
        out["models"] = {"baseline": self.baseline.to_json(), "candidate": self.candidate.to_json()}
        out["data_sha256"] = self.data_sha256
        return out

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        known = {"baseline", "candidate", "tokens", "ppl", "kld", "top1_agreement", "ece", "delta_p", "texts",
                 "settings", "tasks", "models", "data_sha256"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EvalReport: unknown keys {unknown}; valid: {', '.join(sorted(known))}")
        models = data["models"]
        report = cls(overall=TokenScores.from_json(data), texts={k: TokenScores.from_json(v) for k, v in data["texts"].items()},
                     settings=EvalSettings.from_json(data["settings"]), baseline=ModelRef.from_json(models["baseline"]),
                     candidate=ModelRef.from_json(models["candidate"]), data_sha256=data["data_sha256"],
                     tasks=TaskResults.from_json(data["tasks"]) if "tasks" in data else None)
        if (data["baseline"], data["candidate"]) != (report.baseline.name, report.candidate.name):
            raise ValueError("EvalReport: the baseline/candidate names differ from models.baseline/candidate.name")
        return report


def reports_to_json(reports: list[EvalReport]) -> dict:
    """The --json file: one report as it is, several under their candidates' names."""
    if len(reports) == 1:
        return reports[0].to_json()
    return {"baseline": reports[0].baseline.name, "candidates": {r.candidate.name: r.to_json() for r in reports}}


def reports_from_json(data: dict) -> list[EvalReport]:
    if "candidates" in data:
        return [EvalReport.from_json(r) for r in data["candidates"].values()]
    return [EvalReport.from_json(data)]
