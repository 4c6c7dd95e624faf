"""The quality budget the search holds: a YAML mapping; the search reads its `kld_mean`."""

from __future__ import annotations

import math
from pathlib import Path

SEARCH_KEYS = ("kld_mean",)


def read_kld_budget(path: str | Path) -> float:
    """`kld_mean: 0.02` -> 0.02. Other keys are refused by name: the search measures the mean KLD
    on its calibration text, and a term it cannot measure must not pass silently."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--budget {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"--budget {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--budget {path} must be a mapping such as 'kld_mean: 0.02', got {type(data).__name__}")
    other = [k for k in data if k not in SEARCH_KEYS]
    if other:
        raise ValueError(f"--budget {path}: key(s) {', '.join(map(str, other))} are not searched on; the search "
                         f"holds {', '.join(SEARCH_KEYS)} (gate the chosen artifact against the full budget)")
    if "kld_mean" not in data:
        raise ValueError(f"--budget {path} has no kld_mean; write e.g. 'kld_mean: 0.02'")
    value = data["kld_mean"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--budget {path}: kld_mean must be a positive number, got {value!r}")
    return float(value)
