"""The engine loop: one thread owns the engine; other threads submit, cancel and read per-request streams.

    submitter threads / asyncio loop             engine-loop thread (the only caller of Engine.step)
    ---------------------------------            -----------------------------------------------------
    Engine.submit() -> RequestStream  --inbox-->  admit into `waiting`
    Engine.cancel(id) / stream.cancel() -cancels->  abort: the slot is freed, the stream ends "cancelled"
    for ev in stream / async for ev in stream  <--  step() -> events, each put on its request's queue

The mailbox (lock, inbox, cancels, streams) is the only state the two sides share. The thread holds the
engine only through a weak reference between steps, so an engine nobody holds is freed and its thread
ends. An exception inside a step ends the loop: every open stream raises EngineDeadError (with the step's
exception as its cause) and the engine refuses new work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import TYPE_CHECKING

from .params import RequestOutput, TokenEvent

if TYPE_CHECKING:
    from .engine import Engine


class EngineDeadError(RuntimeError):
    """An exception inside a step stopped the engine; its requests cannot finish. Build a new Engine."""


def dead_error(cause: BaseException) -> EngineDeadError:
    return EngineDeadError(f"the engine stopped on an exception inside a step ({type(cause).__name__}: {cause}); "
                           f"its requests cannot finish: build a new Engine")


class _Failed:
    """Queue item: the engine died; the reader raises EngineDeadError from `error`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Mailbox:
    """What submitters and the engine-loop thread share; every field is read and written under `cv`."""

    def __init__(self):
        self.cv = threading.Condition()
        self.inbox: list = []  # engine._Request objects to admit
        self.cancels: list[str] = []
        self.streams: dict[str, RequestStream] = {}  # submitted and not finished
        self.thread: threading.Thread | None = None  # the loop thread while it owns the engine
        self.stop = False  # the thread should cancel what is in flight and exit
        self.persistent = False  # started by Engine.start(): runs until shutdown()
        self.leases = 0  # generate()/stream() calls that run the loop for their duration
        self.error: BaseException | None = None  # set once a step raised: the engine is dead

    def cancel(self, request_id: str) -> None:
        with self.cv:
            if request_id in self.streams:
                self.cancels.append(request_id)
                self.cv.notify_all()

    def close(self) -> None:
        """The engine was freed (weakref finalizer): let the thread end."""
        with self.cv:
            self.stop, self.persistent = True, False
            self.cv.notify_all()

    # ----- called under cv ---------------------------------------------------------------------
    def dispatch(self, events: list[TokenEvent]) -> None:
        for ev in events:
            stream = self.streams.get(ev.request_id)
            if stream is None:
                continue
            delivered = stream._put(ev)
            if ev.finished:
                del self.streams[ev.request_id]
            elif not delivered:  # its reader is gone (a closed asyncio loop): free the slot
                self.cancels.append(ev.request_id)

    def fail(self, error: BaseException) -> None:
        self.error = error
        for stream in self.streams.values():
            stream._put(_Failed(error))
        self.streams.clear()
        self.inbox.clear()
        self.cancels.clear()


def serve(engine_ref, box: Mailbox) -> None:
    """The engine-loop thread: admit, cancel, step, deliver; exit on stop (cancelling what is in flight)."""
    busy = False
    while True:
        with box.cv:
            while not (box.inbox or box.cancels or box.stop or busy):
                box.cv.wait()
            admitted, box.inbox = box.inbox, []
            cancels, box.cancels = box.cancels, []
            stop = box.stop
        engine: Engine | None = engine_ref()
        events: list[TokenEvent] = []
        try:
            if engine is None:  # freed: end every open stream
                with box.cv:
                    box.dispatch([_cancelled(rid) for rid in list(box.streams)])
                    box.thread = None
                    box.cv.notify_all()
                return
            engine.waiting.extend(admitted)
            for rid in cancels:
                ev = engine.abort(rid)
                if ev is not None:
                    events.append(ev)
            if stop:
                events.extend(engine.abort_all())
            elif engine.has_unfinished():
                events.extend(engine.step())
            busy = engine.has_unfinished()
        except BaseException as e:  # noqa: BLE001 - delivered to every waiting request, then the loop ends
            with box.cv:
                box.dispatch(events)
                box.fail(e)
                box.thread = None
                box.cv.notify_all()
            return
        finally:
            del engine
        with box.cv:
            box.dispatch(events)
            if stop and box.stop and not box.inbox:  # nobody took the loop over while it wound down
                box.thread = None
                box.cv.notify_all()
                return


def _cancelled(request_id: str) -> TokenEvent:
    return TokenEvent(request_id, None, "", True, "cancelled", time.perf_counter())


class RequestStream:
    """One submitted request: its TokenEvents in order, the last one `finished`.

    Iterate it (blocking, from any thread), or with `async for` when it was submitted with `loop=`
    (events then arrive through `loop.call_soon_threadsafe`, so the asyncio loop never blocks). Leaving
    the iteration before the last event (a `break`, a client that disconnected, a cancelled task)
    cancels the request and frees its KV slot. Events queue without bound: the engine never waits for
    a slow reader. If the engine dies, iteration raises EngineDeadError."""

    def __init__(self, box: Mailbox, request_id: str, prompt_tokens: int,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self._box, self._loop = box, loop
        self._queue: queue.SimpleQueue | asyncio.Queue = queue.SimpleQueue() if loop is None else asyncio.Queue()
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.nonfinite_logits = 0
        self._error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self._error is not None

    def cancel(self) -> None:
        """Thread-safe; a no-op once the request finished. The stream then ends with finish_reason "cancelled"."""
        self._box.cancel(self.request_id)

    # ----- the engine-loop side -------------------------------------------------------------------
    def _put(self, item) -> bool:
        if self._loop is None:
            self._queue.put(item)
            return True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the asyncio loop is closed: nobody will read this stream
            return False

    # ----- the reader's side -------------------------------------------------------------------------
    def _take(self, item) -> TokenEvent:
        if isinstance(item, _Failed):
            self._error = item.error
            raise dead_error(item.error) from item.error
        if item.token_id is not None:
            self.token_ids.append(item.token_id)
        self.text += item.text
        self.nonfinite_logits = item.nonfinite_logits
        if item.finished:
            self.finish_reason = item.finish_reason
        return item

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was submitted with loop=: read it with `async for` on that loop")
        self._raise_if_dead()
        try:
            while not self.finished:
                yield self._take(self._queue.get())
        finally:
            if not self.finished:
                self.cancel()

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this stream was submitted without loop=: iterate it with a plain `for`")
        self._raise_if_dead()
        try:
            while not self.finished:
                yield self._take(await self._queue.get())
        finally:
            if not self.finished:
                self.cancel()

    def result(self) -> RequestOutput:
        """Block until the request finishes (reading the events not read yet) -> its output."""
        for _ in self:
            pass
        self._raise_if_dead()
        return self._output()

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        self._raise_if_dead()
        return self._output()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise dead_error(self._error) from self._error

    def _output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_tokens, tuple(self.token_ids), self.text,
                             self.finish_reason, self.nonfinite_logits)
