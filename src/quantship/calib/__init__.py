"""Calibration sets: sources, deterministic window sampling, hashing; layer-by-layer capture helpers.

build_calibration(spec, model, tokenizer) -> CalibSet(tokens (n, seqlen) int64, info)

Sampling: each source gets round(n * weight) windows (largest remainder, so they sum to n);
a source's documents are tokenized into one stream (EOS between documents) and its windows
start at positions drawn from a torch.Generator seeded by (seed, source index): the same
spec, seed, sizes and tokenizer always give the same tokens (info["sha256"]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .overlap import SHINGLE_LEN, SHINGLE_STRIDE, calib_shingles, window_hashes
from .sources import parse_source_spec, self_stream, sha256_text, sha256_tokens, source_documents, text_stream


@dataclass(frozen=True)
class CalibSet:
    tokens: torch.Tensor  # (n, seqlen) int64
    info: dict

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.long:
            raise ValueError(f"calibration tokens must be a 2-D int64 tensor, got {tuple(self.tokens.shape)} "
                             f"{self.tokens.dtype}")


def allocate(n: int, weights: list[float]) -> list[int]:
    """Split n samples by weight (largest remainder); every source with weight > 0 may get 0 if n is small."""
    exact = [n * w for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def sample_windows(stream: torch.Tensor, count: int, seqlen: int, generator: torch.Generator,
                   name: str) -> torch.Tensor:
    """`count` windows (count, seqlen) at seeded random starts of a token stream."""
    if stream.numel() < seqlen:
        raise ValueError(
            f"calibration source {name!r} has {stream.numel()} tokens, fewer than one window of "
            f"calib_seqlen={seqlen}; give more text or a smaller --calib-seqlen"
        )
    starts = torch.randint(0, stream.numel() - seqlen + 1, (count,), generator=generator)
    return torch.stack([stream[s: s + seqlen] for s in starts.tolist()]) if count else \
        torch.empty(0, seqlen, dtype=torch.long)


def build_calibration(spec, model, tokenizer) -> CalibSet:
    """Build the calibration set a QuantSpec asks for (spec.calib, calib_samples, calib_seqlen, seed)."""
    n, seqlen, seed = spec.calib_samples, spec.calib_seqlen, spec.seed
    items = parse_source_spec(spec.calib)
    counts = allocate(n, [it.weight for it in items])
    parts, sources = [], []
    for index, (item, count) in enumerate(zip(items, counts)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        if item.name == "self":
            stream = self_stream(model, tokenizer, max(count, 1) * seqlen * 2, seed=seed + index)
            digest = sha256_tokens(stream)
            n_docs = None
        else:
            docs = source_documents(item.name, tokenizer)
            stream = text_stream(docs, tokenizer)
            digest = sha256_text(docs)
            n_docs = len(docs)
        parts.append(sample_windows(stream, count, seqlen, gen, item.name))
        sources.append({"name": item.name, "weight": round(item.weight, 6), "sha256": digest,
                        "documents": n_docs, "stream_tokens": int(stream.numel()), "samples": count})
    tokens = torch.cat(parts).contiguous()
    info = {
        "spec": spec.calib or "default",
        "sources": sources,
        "samples": n,
        "seqlen": seqlen,
        "seed": seed,
        "sha256": sha256_tokens(tokens),
        "window_hashes": window_hashes(tokens),
        "shingle_len": SHINGLE_LEN,
        "shingle_stride": SHINGLE_STRIDE,
        "shingles64": calib_shingles(tokens),
    }
    return CalibSet(tokens, info)


__all__ = ["CalibSet", "allocate", "build_calibration", "sample_windows"]
