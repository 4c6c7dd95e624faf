"""`quantship eval`: one baseline against one or more candidates on the same windows."""

from __future__ import annotations

from pathlib import Path

from ..corpora import corpus_text
from ..fsutil import canonical_json, sha256_bytes
from ..specs import EvalSpec
from .fastpath import dequantized_once
from .metrics import TokenStats, make_windows, score_windows, summarize
from .results import EvalReport, EvalSettings, ModelRef, TokenScores

DEFAULT_TEXTS = ("news",)
SCORED = "second half of each window"


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


def eval_data_sha256(sources: dict[str, str], spec: EvalSpec) -> str:
    """sha256 of what is scored: each text's sha256 with its name, and the window settings."""
    data = {"texts": {name: sha256_bytes(text.encode("utf-8")) for name, text in sources.items()},
            "ctx": spec.ctx, "max_windows": spec.max_windows, "scored": SCORED}
    return sha256_bytes(canonical_json(data).encode())


def in_memory_ref(model, name: str) -> ModelRef:
    """A ModelRef for a model given as an object: its state dict's sha256."""
    from ..models.digest import state_dict_sha256

    return ModelRef(name=name, sha256=state_dict_sha256(model), digest="state_dict")


def compare(baseline, candidate, *, texts=None, spec: EvalSpec = EvalSpec(), progress: bool = True,
            baseline_ref: ModelRef | None = None, candidate_ref: ModelRef | None = None) -> EvalReport:
    """baseline/candidate: (model, tokenizer). -> EvalReport with ppl/kld/top1/delta_p per text and overall.

    texts: overrides spec.texts. The refs name the models and carry their sha256 (evaluate.run fills
    them from the files); without them the models' state dicts are hashed."""
    base_model, base_tok = baseline
    cand_model, cand_tok = candidate
    check_same_tokenizer(base_tok, cand_tok)
    sources = load_texts(texts if texts is not None else spec.texts)
    baseline_ref = baseline_ref or in_memory_ref(base_model, "baseline")
    candidate_ref = candidate_ref or in_memory_ref(cand_model, "candidate")
    overall = TokenStats()
    per_text = {}
    for name, text in sources.items():
        windows = make_windows(base_tok(text, add_special_tokens=False)["input_ids"], spec.ctx, spec.max_windows)
        with dequantized_once(base_model), dequantized_once(cand_model):  # exact; see fastpath.py
            stats = score_windows(base_model, cand_model, windows, spec, desc=f"eval {name}", progress=progress)
        per_text[name] = TokenScores.from_json(summarize(stats))
        for key in vars(stats):
            getattr(overall, key).extend(getattr(stats, key))
    settings = EvalSettings(ctx=spec.ctx, max_windows=spec.max_windows, batch_size=spec.batch_size,
                            texts=tuple(sources), scored=SCORED)
    return EvalReport(overall=TokenScores.from_json(summarize(overall)), texts=per_text, settings=settings,
                      baseline=baseline_ref, candidate=candidate_ref, data_sha256=eval_data_sha256(sources, spec))
