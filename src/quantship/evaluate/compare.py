"""`quantship eval`: one baseline against one or more candidates on the same windows."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..corpora import corpus_text
from ..specs import EvalSpec
from .fastpath import dequantized_once
from .metrics import TokenStats, make_windows, score_windows, summarize

DEFAULT_TEXTS = ("news",)


def load_texts(texts: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """Text sources: a built-in corpus name (news, code: their eval split) or a file path."""
    out = {}
    for item in texts or DEFAULT_TEXTS:
        if item in ("news", "code"):
            out[item] = corpus_text(item, "eval")
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"--text {item!r}: no such file, and not a built-in corpus (news, code)")
        try:
            out[path.name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {item!r} is not UTF-8 text: {e}") from e
    return out


def check_same_tokenizer(base_tok, cand_tok) -> None:
    probe = "The quick brown fox — def f(x): return x**2  # ünïcödé"
    if len(base_tok) != len(cand_tok) or base_tok.encode(probe) != cand_tok.encode(probe):
        raise ValueError("baseline and candidate tokenizers differ; KL divergence needs the same vocabulary")


def compare(baseline, candidate, *, texts=None, spec: EvalSpec = EvalSpec(), progress: bool = True) -> dict:
    """baseline/candidate: (model, tokenizer). -> report dict with ppl/kld/top1/delta_p per text and overall."""
    base_model, base_tok = baseline
    cand_model, cand_tok = candidate
    check_same_tokenizer(base_tok, cand_tok)
    sources = load_texts(texts)
    overall = TokenStats()
    per_text = {}
    for name, text in sources.items():
        windows = make_windows(base_tok(text, add_special_tokens=False)["input_ids"], spec.ctx, spec.max_windows)
        with dequantized_once(base_model), dequantized_once(cand_model):  # exact; see fastpath.py
            stats = score_windows(base_model, cand_model, windows, spec, desc=f"eval {name}", progress=progress)
        per_text[name] = summarize(stats)
        for key in vars(stats):
            getattr(overall, key).extend(getattr(stats, key))
    report = summarize(overall)
    report["texts"] = per_text
    report["settings"] = {**asdict(spec), "texts": list(sources), "scored": "second half of each window"}
    return report
