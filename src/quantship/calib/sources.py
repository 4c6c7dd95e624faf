"""Calibration sources: parse a source spec, read each source's documents, tokenize to a stream.

Spec grammar (comma separated, each item `source[:weight]`, weights > 0, normalised to sum 1):
    default                      = news:0.7,code:0.3 (the packaged calibration splits)
    news | code                  a packaged corpus, calibration split (disjoint from evaluation)
    path/to/file.txt             one text file (any extension other than .jsonl)
    path/to/folder               every *.txt file in it, sorted by name
    path/to/prompts.jsonl        one JSON object per line: {"prompt": ...} or {"messages": [...]}
                                 (messages rendered with the tokenizer's chat template when it has one)
    self                         text the model samples itself from BOS (seeded)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_SPEC = "news:0.7,code:0.3"
BUILTIN_SOURCES = ("news", "code", "self")


@dataclass(frozen=True)
class SourceItem:
    name: str  # as written in the spec
    weight: float  # normalised

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("empty calibration source name")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"calibration source {self.name!r} has weight {self.weight}; weights must be > 0")


def parse_source_spec(spec: str | None) -> tuple[SourceItem, ...]:
    """'news:0.5,code:0.3,my.jsonl:0.2' -> normalised items. A bare source has weight 1."""
    text = (spec or "default").strip()
    if text == "default":
        text = DEFAULT_SPEC
    raw: list[tuple[str, float]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ValueError(f"calibration spec {spec!r} has an empty item; write e.g. {DEFAULT_SPEC!r}")
        name, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(
                    f"calibration spec item {part!r}: weight {tail!r} is not a number; "
                    f"write source:weight, e.g. news:0.7"
                ) from None
            name = head
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"calibration spec item {part!r}: weight must be a positive number, got {tail!r}")
        raw.append((name.strip(), weight))
    names = [n for n, _ in raw]
    if len(set(names)) != len(names):
        raise ValueError(f"calibration spec {spec!r} names a source twice; give each source once with its weight")
    total = sum(w for _, w in raw)
    return tuple(SourceItem(n, w / total) for n, w in raw)


def source_documents(name: str, tokenizer) -> list[str]:
    """The documents of a text source (not `self`)."""
    from ..corpora import documents

    if name in ("news", "code"):
        return documents(name, "calib")
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"calibration source {name!r} is not a built-in source ({', '.join(BUILTIN_SOURCES)}, default) "
            f"nor an existing file or folder; check the path"
        )
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"calibration folder {path} has no *.txt files; put plain-text files in it")
        docs = [_read_text(f) for f in files]
    elif path.suffix == ".jsonl":
        docs = jsonl_documents(path, tokenizer)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration source {name!r} contains no text")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {path} is not UTF-8 text ({e}); convert it or remove it") from e


def jsonl_documents(path: Path, tokenizer) -> list[str]:
    """One document per line: a prompt string, or chat messages rendered with the chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            docs.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            docs.append(render_messages(obj["messages"], tokenizer, has_template, f"{path}:{lineno}"))
        else:
            raise ValueError(
                f'{path}:{lineno}: expected {{"prompt": "..."}} or {{"messages": [{{"role": ..., "content": ...}}]}}'
            )
    return docs


def render_messages(messages: list, tokenizer, has_template: bool, where: str) -> str:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: every message needs string 'role' and 'content', got {m!r}")
    if has_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def text_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """Documents -> one token stream (int64), documents separated by EOS when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def self_stream(model, tokenizer, n_tokens: int, *, seed: int, gen_len: int = 64, batch: int = 16,
                temperature: float = 1.0) -> torch.Tensor:
    """Text the model writes itself: batches of `gen_len`-token samples from BOS, seeded, concatenated."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the 'self' calibration source needs a BOS or EOS token to start generations from")
    gen = torch.Generator().manual_seed(seed)
    chunks: list[torch.Tensor] = []
    produced = 0
    while produced < n_tokens:
        seqs = torch.full((batch, 1), int(bos), dtype=torch.long)
        past = None
        step_in = seqs
        for _ in range(gen_len):
            out = model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
            step_in = torch.multinomial(probs, 1, generator=gen)
            seqs = torch.cat((seqs, step_in), dim=1)
        chunks.append(seqs.reshape(-1))
        produced += seqs.numel()
    return torch.cat(chunks)[: max(n_tokens, 1)]


def sha256_text(docs: list[str]) -> str:
    return hashlib.sha256("\n\n".join(docs).encode("utf-8")).hexdigest()


def sha256_tokens(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
