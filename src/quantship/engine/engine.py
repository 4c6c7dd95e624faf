"""The engine: continuous batching over a preallocated KV cache.

Every `step()` first admits waiting requests into free slots (prefill emits each one's first
token), then runs one batched decode step for all running requests. A request that finishes
leaves at once and its slot is refilled by compaction (the last running slot moves into the
hole), so decode always reads slots 0..n-1.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..models.arch import engine_facts
from .forward import DecoderForward
from .kv_cache import KVCache
from .native_decode import NativeDecode
from .params import SamplingParams, TokenEvent
from .sampling import sample_token


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    text: str = ""  # decoded output so far (what has been emitted)
    length: int = 0  # tokens in the KV cache


class Engine:
    """Serve a causal LM. With fast=True (default) quantized layers switch to their integer kernels
    (bf16 activations) and the engine takes ownership of the model: repacked layers drop their
    packed codes, so save artifacts before building an engine. fast=False is the exact reference."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache: str = "float32", fast: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        windows = engine_facts(cfg.model_type)[1].layer_windows  # sliding-window layers are masked
        if not windows and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            limit = min(limit, cfg.sliding_window)  # no sliding-window attention here: stay inside one window
        self.max_seq_len = min(max_seq_len or 2048, limit)
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.fast = fast
        self.forward = DecoderForward(model, head=self._fast_head() if fast else None)
        self.fused = self.forward.fuse() if fast else 0
        self.kernels = self._prepare_fast() if fast else {}
        f = self.forward
        self.cache = KVCache(len(f.layers), max_batch, f.n_kv, self.max_seq_len, f.head_dim, kv_cache)
        # why decode runs the Python layer loop (None: it runs natively, or fast=False asked for the reference)
        self.decode_note: str | None = None
        if fast:
            f.native, self.decode_note = NativeDecode.build(f, self.cache)
        self.decode_path = "native" if f.native is not None else "python"
        self.eos_ids = self._eos_ids()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # running[i] occupies cache slot i
        self._ids = itertools.count()

    # ----- set-up -------------------------------------------------------------------------------
    def _prepare_fast(self) -> dict[str, int]:
        # Kernels that repack weights (int4) would otherwise hold two copies: the engine owns the
        # model from here on, so the packed codes are released (forward still works; saving does not).
        from ..formats.kernels import prepare_model

        return prepare_model(self.model, release_codes=True)

    def _fast_head(self):
        """int8 weight-only copy of a float lm_head: at batch 1 the head is the largest matrix read."""
        from ..formats.grid import QuantizedWeight, quantize_weight
        from ..formats.linear import QuantLinear
        from ..formats.scheme import parse_scheme

        head = self.model.get_submodule(engine_facts(self.model.config.model_type)[1].head)
        if isinstance(head, QuantLinear):
            return head
        # Per-channel scales make rows independent: quantizing in row blocks gives the same codes
        # while the float temporaries stay one block big (whole-matrix temporaries of a fp32 head
        # were the process's peak memory: ~3 extra copies of a 113 MB matrix on SmolLM2).
        scheme, w = parse_scheme("w8"), head.weight.detach()
        parts = [quantize_weight(scheme, w[i:i + 4096]) for i in range(0, w.shape[0], 4096)]
        qw = QuantizedWeight(scheme, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), None)
        layer = QuantLinear.from_quantized(qw, head.bias.detach() if head.bias is not None else None)
        layer.prepare_fast()
        return layer

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None),
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def kv_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token: every decoder layer (with the fused q/k/v and gate/up
        projections and the kernels' repacked copies), the final norm and the head; embeddings: one row."""
        f = self.forward
        modules = [*f.layers, *(m for m in f.qkv + f.gate_up if m is not None), f.final_norm, f.head]
        return sum(t.numel() * t.element_size() for t in _tensors(modules))

    # ----- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"request needs {len(ids)} prompt + {params.max_tokens} new tokens = {len(ids) + params.max_tokens}, "
                f"more than the context of {self.max_seq_len}; shorten the prompt or lower max_tokens"
            )
        rid = request_id or f"req-{next(self._ids)}"
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.waiting.append(_Request(rid, ids, params, gen))
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for i, r in enumerate(self.running):
            if r.id == request_id:
                self._release(i)
                return

    # ----- scheduling -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            slot = len(self.running)
            self.running.append(req)
            logits = self.forward.prefill(torch.tensor(req.prompt), self.cache, slot)
            req.length = len(req.prompt)
            events.append(self._accept(slot, logits))
        self._drop_finished()
        if self.running:
            n = len(self.running)
            ids = torch.tensor([r.output[-1] for r in self.running])
            positions = torch.tensor([r.length for r in self.running])
            logits = self.forward.decode(ids, positions, self.cache)
            for i, req in enumerate(self.running):
                req.length += 1
            events.extend(self._accept(i, logits[i]) for i in range(n))
            self._drop_finished()
        return events

    def _accept(self, slot: int, logits: torch.Tensor) -> TokenEvent:
        req = self.running[slot]
        seen = torch.tensor(req.prompt + req.output) if req.params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
        token = sample_token(logits, req.params, seen, req.generator)
        req.output.append(token)
        full = self.tokenizer.decode(req.output, skip_special_tokens=True)
        new_text = full[len(req.text):] if full.startswith(req.text) else full
        reason = None
        if token in self.eos_ids and not req.params.ignore_eos or token in req.params.stop_token_ids:
            reason = "stop"
        stop_at = min((full.find(s) for s in req.params.stop if s in full), default=-1)
        if stop_at >= 0:
            new_text = full[len(req.text):stop_at] if stop_at >= len(req.text) else ""
            reason = "stop"
        elif reason is None and len(req.output) >= req.params.max_tokens:
            reason = "length"
        req.text += new_text
        req.finished = reason
        return TokenEvent(req.id, token, new_text, reason is not None, reason, time.perf_counter())

    def _drop_finished(self) -> None:
        for i in range(len(self.running) - 1, -1, -1):
            if getattr(self.running[i], "finished", None):
                self._release(i)

    def _release(self, slot: int) -> None:
        last = len(self.running) - 1
        if slot != last:  # compaction: the last running request moves into the freed slot
            self.cache.move(last, slot, self.running[last].length)
            self.running[slot] = self.running[last]
        self.running.pop()

    # ----- conveniences -----------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for ev in self.step():
                outputs[ev.request_id].append(ev.token_id)
        return [outputs[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Iterator[TokenEvent]:
        rid = self.add_request(prompt, params)
        while self.has_unfinished():
            for ev in self.step():
                if ev.request_id == rid:
                    yield ev


def _tensors(modules):
    """Distinct non-empty tensors of the modules: parameters, buffers and fast-kernel state (repacked weights)."""
    seen = set()
    for module in modules:
        for m in module.modules():
            state = [t for t in getattr(m, "kernel_state", {}).values() if isinstance(t, torch.Tensor)]
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *state]:
                if t.numel() and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    yield t
