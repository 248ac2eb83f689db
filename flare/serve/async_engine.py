"""The engine behind an asyncio server: one background thread owns and steps it.

The event loop never touches the engine: ``submit`` and ``abort`` post commands to an inbox that the engine
thread drains before every step (so a request is admitted or dropped within one step, and a busy engine never
starves the server). ``submit`` resolves once the engine has accepted the request (or refused it: RequestError,
QueueFull) and returns a ``Channel`` that receives the request's ``RequestOutput`` after every step that
committed something for it, or an ``EngineFailed`` if the engine could not go on.

Every hand-over to the event loop wakes it (a write to its self-pipe) and takes the interpreter lock from the
engine thread, so a step's outputs for all requests go over in ONE ``call_soon_threadsafe`` per loop, and a
consumer that has fallen behind takes every output waiting at once (``Channel.get``). A request that needs only
its end (``submit(..., final_only=True)``: not streamed, no stop strings to watch) is handed its final output
alone, so the event loop does nothing for it while it decodes.
"""

from __future__ import annotations

import asyncio
import logging
import queue as queue_mod
import threading
from typing import Any, Callable

from flare.decoding import ModeOptions, SamplingParams
from flare.engine import Engine, RequestOutput
from flare.serve.metrics import Tally, snapshot

log = logging.getLogger("flare.serve")


class EngineFailed(RuntimeError):
    """The engine raised while stepping, or is shutting down; the requests in flight end with this error."""


class Channel:
    """(event loop) One request's outputs in the order they came; ``get`` takes all that are waiting."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> list[Any]:
        """Every item waiting (at least one), oldest first."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class AsyncEngine:
    """The engine in a thread of the server's process (``flare.serve.engine_process`` runs it in its own)."""

    def __init__(self, engine: Engine, on_step: Callable[[Tally], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self.inbox: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.wake = threading.Event()
        # request id -> (its event loop, its output channel, final output only); touched only by the engine thread.
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, Channel, bool]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="flare-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def snapshot(self) -> dict:
        """The engine's gauges for /metrics (read from the event loop: counters, a moment old at worst)."""
        return snapshot(self.engine)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still in flight are aborted and told so."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
        self._drain()
        for rid in list(self.queues):
            self.engine.abort(rid)
            self._deliver(rid, EngineFailed("the server is shutting down"))
        self.queues.clear()

    async def submit(self, prompt_ids: list[int], params: SamplingParams, mode: ModeOptions | None,
                     final_only: bool = False) -> tuple[str, Channel]:
        """Queue a request; raises what the engine raises for it (RequestError, QueueFull). ``final_only``: the
        channel receives the request's final output only (its ``sequence`` holds every committed token)."""
        if self.stopping:
            raise EngineFailed("the server is shutting down")
        loop = asyncio.get_running_loop()
        accepted, outputs = loop.create_future(), Channel()
        self.inbox.put(("add", (prompt_ids, params, mode), loop, accepted, outputs, final_only))
        self.wake.set()
        return await accepted, outputs

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))
        self.wake.set()

    def reset_prefix_cache(self) -> None:
        """Forget the kept prompt beginnings (between the steps, before the requests submitted after this)."""
        self.inbox.put(("reset_prefix_cache",))
        self.wake.set()

    # ------------------------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item) -> None:
        entry = self.queues.get(request_id)
        if entry is not None:
            _call(entry[0], entry[1].put, item)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, one hand-over per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Channel, RequestOutput]]] = {}
        for out in outputs:
            entry = self.queues.get(out.request_id)
            # A step that committed nothing for a request (a denoising step) is not worth a wake-up.
            if entry is not None and (out.finished or (out.new_token_ids and not entry[2])):
                batches.setdefault(entry[0], []).append((entry[1], out))
            if out.finished:
                self.queues.pop(out.request_id, None)
        for loop, items in batches.items():
            _call(loop, _put_all, items)

    def _drain(self) -> None:
        while not self.inbox.empty():
            try:
                cmd = self.inbox.get_nowait()
            except queue_mod.Empty:
                return
            if cmd[0] == "abort":
                self.queues.pop(cmd[1], None)
                self.engine.abort(cmd[1])
                continue
            if cmd[0] == "reset_prefix_cache":
                self.engine.reset_prefix_cache()
                continue
            _, args, loop, accepted, outputs, final_only = cmd
            if self.stopping:
                _call(loop, self._settle, accepted, None, EngineFailed("the server is shutting down"))
                continue
            try:
                seq = self.engine.add_request(*args)
            except Exception as e:  # noqa: BLE001 - the refusal goes back to the caller
                _call(loop, self._settle, accepted, None, e)
                continue
            self.queues[seq.request_id] = (loop, outputs, final_only)
            _call(loop, self._settle, accepted, seq.request_id, None)

    def _run(self) -> None:
        while not self.stopping:
            self._drain()
            if not self.engine.has_work:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - every waiting client must hear of it
                log.exception("engine step failed; ending the requests in flight")
                for rid in list(self.queues):
                    self.engine.abort(rid)
                    self._deliver(rid, EngineFailed(f"engine step failed: {type(e).__name__}: {e}"))
                self.queues.clear()
                continue
            if self.on_step is not None:  # before the outputs reach clients: a client that has its answer and
                # reads /metrics finds the step counted (as the engine process's pipe orders them)
                tally = Tally()
                tally.add(outputs, self.engine.stats.step_seconds)
                self.on_step(tally)
            self._publish(outputs)

    def _settle(self, fut: asyncio.Future, result, error) -> None:
        """(event loop) Resolve a submission; one whose caller has gone is aborted at once."""
        if fut.cancelled():
            if result is not None:
                self.abort(result)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


def _put_all(items: list[tuple[Channel, Any]]) -> None:
    for channel, item in items:
        channel.put(item)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
