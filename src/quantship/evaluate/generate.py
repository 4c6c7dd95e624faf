"""Greedy generation for suite items on any Hugging Face causal LM.

Prompt rendering: when the tokenizer has a chat template and the item is not `raw`, the item's
messages (or its prompt as one user message) go through `apply_chat_template(...,
add_generation_prompt=True)`; otherwise the prompt is used as is (messages joined by blank
lines). Decoding is greedy (do_sample=False), at most `item.max_tokens` new tokens, stopped at
EOS or at the first of `item.stop` (the stop string is cut from the output). Items are
batched, left-padded, sorted by prompt length so batches pad little; outputs come back in
input order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .suites import Item


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


class _StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once its new text contains one of its stop strings."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[tuple[str, ...]]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, stops in enumerate(self.stops):
            if stops:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
                done[row] = any(s in text for s in stops)
        return done


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
def generate(model, tokenizer, items: Sequence[Item], *, batch_size: int = 8, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """Greedy outputs, one string per item, in item order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rendered = [render_prompt(tokenizer, it) for it in items]
    encoded = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special, _ in rendered]
    item_stops = [stops for _, _, stops in rendered]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    pad_id = _pad_id(tokenizer, model)
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="item")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: (B, T)
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        max_new = max(items[i].max_tokens for i in idx)
        stops = [item_stops[i] for i in idx]
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new,
            pad_token_id=pad_id, eos_token_id=eos, temperature=None, top_p=None, top_k=None,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(tokenizer, width, stops)]),
        )
        for row, i in enumerate(idx):
            new = out[row, width : width + items[i].max_tokens].tolist()
            if eos is not None:
                eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
                for k, tok in enumerate(new):
                    if tok in eos_ids:
                        new = new[:k]
                        break
            text = tokenizer.decode(new, skip_special_tokens=True)
            outputs[i] = cut_at_stop(text, item_stops[i])
        bar.update(len(idx))
    bar.close()
    return outputs
