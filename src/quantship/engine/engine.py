"""The engine: continuous batching over a preallocated KV cache, owned by one thread at a time.

Every `step()` first admits waiting requests into free slots (prefill emits each one's first
token), then runs one batched decode step for all running requests. A request that finishes
leaves at once and its slot is refilled by compaction (the last running slot moves into the
hole), so decode always reads slots 0..n-1.

Two ways to drive it, never both at once:
    the engine loop   `start()` (a server) or `generate()` / `stream()` (for their duration) run a
                      thread that alone calls `step()`; any thread `submit()`s a request and reads
                      its own RequestStream, `cancel()` frees its slot (engine/loop.py)
    the bare core     one caller thread calls `add_request()`, `step()`, `abort()` itself, with no
                      thread in between (single-stream benchmarks, profiling); refused while the
                      loop runs
Step hooks (`add_step_hook`) see every forward: kind, batch size, tokens, duration (metrics).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .detok import IncrementalDetokenizer
from .forward import LlamaForward
from .kv_cache import KVCache
from .loop import Mailbox, RequestStream, dead_error, serve
from .native_decode import NativeDecode
from .params import SamplingParams, StepInfo, TokenEvent
from .sampling import sample_token


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    output: list[int] = field(default_factory=list)
    text: str = ""  # text emitted so far
    length: int = 0  # tokens in the KV cache
    finished: str | None = None  # the finish reason, once finished
    nonfinite_logits: int = 0  # positions whose logits held a NaN or an infinity


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
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            limit = min(limit, cfg.sliding_window)  # no sliding-window attention here: stay inside one window
        self.max_seq_len = min(max_seq_len or 2048, limit)
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.fast = fast
        self.forward = LlamaForward(model, head=self._fast_head() if fast else None)
        self.fused = self.forward.fuse() if fast else 0
        self.kernels = self._prepare_fast() if fast else {}
        f = self.forward
        self.cache = KVCache(len(f.layers), max_batch, f.n_kv, self.max_seq_len, f.head_dim, kv_cache)
        if fast:
            f.native = NativeDecode.build(f, self.cache)
        self.decode_path = "native" if f.native is not None else "python"
        self.eos_ids = self._eos_ids()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # running[i] occupies cache slot i
        self._ids = itertools.count()
        self.nonfinite_logits = 0  # over all requests: sampled positions whose logits held a NaN or an infinity
        self._hooks: tuple[Callable[[StepInfo], None], ...] = ()
        self._tokenizer_lock = threading.Lock()  # submitters encode prompts from their own threads
        self._box = Mailbox()
        weakref.finalize(self, self._box.close)  # a freed engine ends its loop thread

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

        head = self.model.lm_head
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
        modules = [*f.layers, *(m for m in f.qkv + f.gate_up if m is not None), f.inner.norm, f.head]
        return sum(t.numel() * t.element_size() for t in _tensors(modules))

    # ----- state ----------------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine inside a step, or None."""
        return self._box.error

    @property
    def dead(self) -> bool:
        """True once an exception inside a step stopped the engine: it refuses all work from then on."""
        return self._box.error is not None

    @property
    def loop_running(self) -> bool:
        return self._box.thread is not None

    def add_step_hook(self, hook: Callable[[StepInfo], None]) -> None:
        """Call `hook(StepInfo)` after every forward (in the thread that steps). A hook that raises stops the
        engine like any other exception inside a step. Thread-safe: the stepping thread reads one snapshot."""
        with self._box.cv:
            self._hooks = (*self._hooks, hook)

    def remove_step_hook(self, hook: Callable[[StepInfo], None]) -> None:
        with self._box.cv:
            hooks = list(self._hooks)
            hooks.remove(hook)
            self._hooks = tuple(hooks)

    @contextmanager
    def step_hook(self, hook: Callable[[StepInfo], None]):
        """`with engine.step_hook(fn):` fn is called after every forward inside the block."""
        self.add_step_hook(hook)
        try:
            yield hook
        finally:
            self.remove_step_hook(hook)

    # ----- the engine loop (any thread) -------------------------------------------------------
    def start(self) -> Engine:
        """Run the engine-loop thread until `shutdown()`: from now on requests go through `submit()`."""
        with self._box.cv:
            self._ensure_loop()
            self._box.persistent = True
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop thread: requests in flight (generate()'s included) end with finish_reason "cancelled";
        joins the thread.
        The bare core (or a later `start()`) can use the engine afterwards."""
        box = self._box
        with box.cv:
            box.persistent = False
            thread = box.thread
            if thread is None:
                return
            box.stop = True
            box.cv.notify_all()
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def submit(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
               request_id: str | None = None, *, loop=None) -> RequestStream:
        """Thread-safe: queue a request for the running loop -> its stream of TokenEvents.

        The prompt is tokenized and checked here, in the caller's thread (a ValueError names what is
        wrong). From asyncio, pass `loop=asyncio.get_running_loop()` and read with `async for`;
        abandoning that iteration (client disconnect) cancels the request."""
        return self._enqueue([self._make_request(prompt, params, request_id)], loop)[0]

    def cancel(self, request_id: str) -> None:
        """Thread-safe: end a submitted request (its stream's last event has finish_reason "cancelled")
        and free its KV slot. A no-op for unknown or finished requests."""
        self._box.cancel(request_id)

    def _ensure_loop(self) -> None:
        """Under the mailbox lock: a loop thread runs (a winding-down one is taken over)."""
        box = self._box
        if box.error is not None:
            raise dead_error(box.error) from box.error
        if box.thread is threading.current_thread():
            raise RuntimeError("called from the engine-loop thread (a step hook?): it would wait for itself")
        if box.thread is not None:
            box.stop = False
            box.cv.notify_all()
            return
        if self.waiting or self.running:
            raise RuntimeError("the engine has requests added with add_request(): finish them with step() "
                               "(or abort() them) before running the engine loop")
        box.stop = False
        box.thread = threading.Thread(target=serve, args=(weakref.ref(self), box), name="quantship-engine",
                                      daemon=True)
        box.thread.start()

    def _enqueue(self, requests: list[_Request], loop=None) -> list[RequestStream]:
        box = self._box
        with box.cv:
            if box.error is not None:
                raise dead_error(box.error) from box.error
            if box.thread is None or box.stop:
                raise RuntimeError("the engine loop is not running: call engine.start() first "
                                   "(or use generate() / stream(), which run it for their duration)")
            ids = [r.id for r in requests]
            taken = [i for i in ids if i in box.streams] + [i for n, i in enumerate(ids) if i in ids[:n]]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in flight; ids must be unique")
            streams = [RequestStream(box, r.id, len(r.prompt), loop) for r in requests]
            box.streams.update((s.request_id, s) for s in streams)
            box.inbox.extend(requests)
            box.cv.notify_all()
        return streams

    @contextmanager
    def _lease(self):
        """Run the loop for the duration of a generate()/stream() call (kept if start() runs it)."""
        box = self._box
        with box.cv:
            self._ensure_loop()
            box.leases += 1
        try:
            yield
        finally:
            with box.cv:
                box.leases -= 1
                if box.leases == 0 and not box.persistent and box.thread is not None:
                    box.stop = True
                    box.cv.notify_all()
                    while box.stop and box.thread is not None:  # exited, or taken over by a new lease
                        box.cv.wait()

    # ----- conveniences (any thread, on top of the loop) ------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, plist)]  # all checked before any runs
        with self._lease():
            return [list(s.result().token_ids) for s in self._enqueue(requests)]

    def stream(self, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Iterator[TokenEvent]:
        """The request's events as they come; leaving the loop early cancels the request."""
        request = self._make_request(prompt, params)
        with self._lease():
            yield from self._enqueue([request])[0]

    # ----- the bare core (one owner thread) ---------------------------------------------------------
    def _make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> _Request:
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"request needs {len(ids)} prompt + {params.max_tokens} new tokens = {len(ids) + params.max_tokens}, "
                f"more than the context of {self.max_seq_len}; shorten the prompt or lower max_tokens"
            )
        rid = request_id or f"req-{next(self._ids)}"
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        return _Request(rid, ids, params, gen, IncrementalDetokenizer(self.tokenizer))

    def _check_owner(self) -> None:
        box = self._box
        if box.error is not None:
            raise dead_error(box.error) from box.error
        thread = box.thread
        if thread is not None and thread is not threading.current_thread():
            raise RuntimeError("the engine loop owns this engine: use submit() / cancel() (or shutdown() the "
                               "loop before calling add_request() / step() / abort())")

    def add_request(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        self._check_owner()
        req = self._make_request(prompt, params, request_id)
        self.waiting.append(req)
        return req.id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> TokenEvent | None:
        """End a request now (its slot is freed) -> its last event (finish_reason "cancelled"), or None if unknown."""
        self._check_owner()
        for i, r in enumerate(self.waiting):
            if r.id == request_id:
                del self.waiting[i]
                return self._cancelled(r)
        for i, r in enumerate(self.running):
            if r.id == request_id:
                self._release(i)
                return self._cancelled(r)
        return None

    def abort_all(self) -> list[TokenEvent]:
        return [ev for ev in (self.abort(r.id) for r in [*self.waiting, *self.running]) if ev is not None]

    @staticmethod
    def _cancelled(req: _Request) -> TokenEvent:
        req.finished = "cancelled"
        text = req.detok.flush()  # text held back for an incomplete character
        req.text += text
        return TokenEvent(req.id, None, text, True, "cancelled", time.perf_counter(), req.nonfinite_logits)

    # ----- scheduling -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self._check_owner()
        try:
            return self._step()
        except BaseException as e:
            with self._box.cv:
                self._box.error = e  # K/V and slots may be half-written: the engine refuses further work
            raise

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            slot = len(self.running)
            self.running.append(req)
            t0 = time.perf_counter()
            logits = self.forward.prefill(torch.tensor(req.prompt), self.cache, slot)
            self._run_hooks("prefill", 1, len(req.prompt), t0)
            req.length = len(req.prompt)
            events.append(self._accept(slot, logits, bool(torch.isfinite(logits).all())))
        self._drop_finished()
        if self.running:
            n = len(self.running)
            ids = torch.tensor([r.output[-1] for r in self.running])
            positions = torch.tensor([r.length for r in self.running])
            t0 = time.perf_counter()
            logits = self.forward.decode(ids, positions, self.cache)
            self._run_hooks("decode", n, n, t0)
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            for i, req in enumerate(self.running):
                req.length += 1
            events.extend(self._accept(i, logits[i], finite[i]) for i in range(n))
            self._drop_finished()
        return events

    def _run_hooks(self, kind: str, batch_size: int, tokens: int, t0: float) -> None:
        hooks = self._hooks
        if hooks:
            info = StepInfo(kind, batch_size, tokens, time.perf_counter() - t0, t0)
            for hook in hooks:
                hook(info)

    def _accept(self, slot: int, logits: torch.Tensor, finite: bool) -> TokenEvent:
        req = self.running[slot]
        if not finite:
            req.nonfinite_logits += 1
            self.nonfinite_logits += 1
        seen = torch.tensor(req.prompt + req.output) if req.params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
        token = sample_token(logits, req.params, seen, req.generator)
        req.output.append(token)
        new_text = req.detok.push(token)
        reason = None
        if token in self.eos_ids and not req.params.ignore_eos or token in req.params.stop_token_ids:
            reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            reason = "length"
        if reason is not None:
            new_text += req.detok.flush()  # a character left incomplete at the end
        cut = _stop_cut(req.text, new_text, req.params.stop)
        if cut is not None:
            new_text, reason = new_text[:cut], "stop"
        req.text += new_text
        req.finished = reason
        return TokenEvent(req.id, token, new_text, reason is not None, reason, time.perf_counter(), req.nonfinite_logits)

    def _drop_finished(self) -> None:
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].finished:
                self._release(i)

    def _release(self, slot: int) -> None:
        last = len(self.running) - 1
        if slot != last:  # compaction: the last running request moves into the freed slot
            self.cache.move(last, slot, self.running[last].length)
            self.running[slot] = self.running[last]
        self.running.pop()


def _stop_cut(emitted: str, new_text: str, stops: tuple[str, ...]) -> int | None:
    """Where to cut `new_text` if a stop string now occurs in emitted + new_text (the earliest one; text from
    its start on is dropped), else None. Only the tail of `emitted` that a stop string can reach is searched."""
    if not stops or not new_text:
        return None
    reach = max(len(s) for s in stops) - 1
    tail = emitted[max(0, len(emitted) - reach):] if reach else ""
    window = tail + new_text
    found = [window.find(s) for s in stops if s in window]
    if not found:
        return None
    return max(0, min(found) - len(tail))


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
