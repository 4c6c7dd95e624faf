"""Does an evaluation text overlap the calibration set? Shingle hashing of token runs.

A shingle is a run of SHINGLE_LEN (64) token ids, hashed as sha256 of its int64 bytes,
truncated to 16 hex chars. The calibration set keeps the shingles that start every
SHINGLE_STRIDE (32) tokens of each window (sorted, in the manifest as `shingles64`); an
evaluation window is checked at every start (stride 1). Any shared run of at least
SHINGLE_LEN + SHINGLE_STRIDE - 1 = 95 tokens is therefore always found (one of the calibration
shingles lies wholly inside it); shorter shared runs of >= 64 tokens are found when aligned.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

SHINGLE_LEN = 64
SHINGLE_STRIDE = 32


def _hash_rows(rows: np.ndarray) -> list[str]:
    return [hashlib.sha256(r.tobytes()).hexdigest()[:16] for r in rows]


def _shingle_rows(window: np.ndarray, stride: int) -> np.ndarray:
    if window.shape[0] < SHINGLE_LEN:
        return np.empty((0, SHINGLE_LEN), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(window, SHINGLE_LEN)  # (L - 63, 64)
    return np.ascontiguousarray(view[::stride])


def window_hashes(tokens: torch.Tensor) -> list[str]:
    """sha256 of each window's token ids as int64 bytes. tokens (n, seqlen)."""
    arr = tokens.to(torch.int64).contiguous().numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in arr]


def calib_shingles(tokens: torch.Tensor) -> list[str]:
    """Sorted unique 64-token shingle hashes of the calibration windows at stride 32."""
    arr = tokens.to(torch.int64).contiguous().numpy()
    out: set[str] = set()
    for row in arr:
        out.update(_hash_rows(_shingle_rows(row, SHINGLE_STRIDE)))
    return sorted(out)


def find_overlap(calibration_info: dict, eval_windows: torch.Tensor) -> str:
    """'' when no evaluation window shares a 64-token run with the calibration set, else a description."""
    shingles = set((calibration_info or {}).get("shingles64") or ())
    if not shingles:
        return ""
    windows = torch.as_tensor(eval_windows).to(torch.int64)
    if windows.dim() == 1:
        windows = windows.unsqueeze(0)
    arr = windows.contiguous().numpy()
    hit_windows, first = [], None
    for i, row in enumerate(arr):
        for j, h in enumerate(_hash_rows(_shingle_rows(row, 1))):
            if h in shingles:
                hit_windows.append(i)
                if first is None:
                    first = (i, j)
                break
    if not hit_windows:
        return ""
    i, j = first
    return (f"{len(hit_windows)} of {len(arr)} evaluation windows share a run of >= {SHINGLE_LEN} tokens with "
            f"the calibration set (spec {calibration_info.get('spec')!r}; first: window {i} at token {j})")
