"""Greedy generation for suite items on any Hugging Face causal LM.

Prompt rendering: when the tokenizer has a chat template and the item is not `raw`, the item's
messages (or its prompt as one user message) go through `apply_chat_template(...,
add_generation_prompt=True)`; otherwise the prompt is used as is (messages joined by blank
lines). Decoding is greedy (do_sample=False), at most `item.max_tokens` new tokens, stopped at
EOS or at the first of `item.stop` (the stop string is cut from the output). A `code` item also
stops once its output holds a complete fenced code block (the checker runs only the first block,
so nothing after it can change the result); the output is cut just after that block's closing
fence.

Batching: items are sorted by prompt length and packed into left-padded batches of at most
`batch_size` rows and `max_batch_tokens` padded prompt tokens (long prompts go in small batches,
short ones in large ones: a decode step reads all weights once, whatever the batch size, so large
batches of short prompts are nearly free on CPU). Outputs come back in input order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .checkers.programs import end_of_first_code_block
from .suites import Item

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 8192  # rows x padded prompt length per batch


def render_prompt(tokenizer, item: Item) -> tuple[str, bool, tuple[str, ...]]:
    """(text, add_special_tokens, stop strings) for one item.

    Chat template (when the tokenizer has one and the item is not `raw`): messages, or the prompt as
    one user message. Otherwise `base_prompt` (with `base_stop`) when the item has one, else the
    prompt as is (messages joined by blank lines), with `stop`.
    """
    messages = list(item.messages) if item.messages is not None else [{"role": "user", "content": item.prompt}]
    if getattr(tokenizer, "chat_template", None) and not item.raw:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False, item.stop  # the template already holds BOS / special tokens
    if item.base_prompt is not None:
        return item.base_prompt, True, item.base_stop
    if item.prompt is not None:
        return item.prompt, True, item.stop
    return "\n\n".join(m["content"] for m in messages), True, item.stop


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def stops_after_code_block(item: Item) -> bool:
    """Whether generation for this item may stop after the first complete fenced code block."""
    return item.checker == "code"


def finish_output(text: str, stops: Sequence[str], code_block: bool) -> str:
    """The output as checked: cut at the first stop string, and after the first code block."""
    text = cut_at_stop(text, stops)
    if code_block:
        end = end_of_first_code_block(text)
        if end is not None:
            text = text[:end]
    return text


class _StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once its new text contains one of its stop strings (or, for
    rows flagged `code_block`, a complete fenced code block)."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[tuple[str, ...]], code_block: list[bool] | None = None,
                 max_tokens: list[int] | None = None):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops
        self.code_block = code_block or [False] * len(stops)
        self.max_tokens = max_tokens  # per row: done once it has this many new tokens (rows of one batch may differ)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        for row, (stops, block) in enumerate(zip(self.stops, self.code_block)):
            if self.max_tokens is not None and n_new >= self.max_tokens[row]:
                done[row] = True
            elif stops or block:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
                done[row] = any(s in text for s in stops) or (block and end_of_first_code_block(text) is not None)
        return done


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each batch at most `batch_size` rows and
    rows x (longest prompt in it) <= `max_batch_tokens` (a longer prompt goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:  # ascending: the newcomer is the widest row of the batch
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def eos_token_ids(model, tokenizer) -> list[int]:
    """The model's EOS ids (generation config, else the tokenizer's); token id 0 is a valid EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None or eos == []:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _pad_id(tokenizer, model) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None),
                      getattr(model.config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an EOS token, so prompts cannot be batched; "
                     "set tokenizer.pad_token or use batch_size=1")


@torch.inference_mode()
def generate(model, tokenizer, items: Sequence[Item], *, batch_size: int = DEFAULT_BATCH_SIZE,
             max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """Greedy outputs, one string per item, in item order."""
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size} and {max_batch_tokens}")
    rendered = [render_prompt(tokenizer, it) for it in items]
    encoded = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special, _ in rendered]
    item_stops = [stops for _, _, stops in rendered]
    code_block = [stops_after_code_block(it) for it in items]
    pad_id = _pad_id(tokenizer, model)
    eos = eos_token_ids(model, tokenizer)
    eos_ids = set(eos)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="item")
    for idx in plan_batches([len(e) for e in encoded], batch_size, max_batch_tokens):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: (B, T)
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        max_new = max(items[i].max_tokens for i in idx)
        stopper = _StopOnStrings(tokenizer, width, [item_stops[i] for i in idx], [code_block[i] for i in idx],
                                 [items[i].max_tokens for i in idx])
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new,
            pad_token_id=pad_id, eos_token_id=eos or None, temperature=None, top_p=None, top_k=None,
            stopping_criteria=StoppingCriteriaList([stopper]),
        )
        for row, i in enumerate(idx):
            new = out[row, width : width + items[i].max_tokens].tolist()
            for k, tok in enumerate(new):
                if tok in eos_ids:
                    new = new[:k]
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            outputs[i] = finish_output(text, item_stops[i], code_block[i])
        bar.update(len(idx))
    bar.close()
    return outputs
