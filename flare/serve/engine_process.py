"""The engine in a process of its own (``flare serve``'s default; ``--engine thread`` keeps it in the server's).

The server's process does HTTP, SSE, tokenization and text; a spawned child loads the checkpoint, owns the
engine and steps it with every core's intra-op threads. Neither waits for the other's interpreter lock, and the
engine's OpenMP team no longer shares its cores with the event loop's Python (with the engine in a thread, the
server had to leave a core to the event loop: ``leave_a_core``).

One duplex pipe of pickled tuples joins them:

- server -> engine: ``("add", tag, prompt_ids, params, mode, final_only)``, ``("abort", request_id)``,
  ``("stop",)``;
- engine -> server: ``("ready", info)`` once the model is loaded and warmed up (``("error", kind, message)`` if
  it could not be); ``("added", tag, request_id, options)`` or ``("refused", tag, kind, message)`` per submission;
  ``("step", deliveries, tally, gauges)`` after a step that committed something a client waits for (else at most
  every ``QUIET`` seconds, and when the engine goes idle or a request is aborted, so the gauges stay true);
  ``("failed", message)`` when a step raised (the requests in flight end with it).

The server's event loop reads the pipe when it is readable (``loop.add_reader``): no thread on that side. A
delivery is ``(request_id, new_ids, finish_reason, forwards, drafted, accepted, output_ids)``, the whole
``output_ids`` only when the request ends; the server keeps a mirror ``Sequence`` per request, so the app reads
``RequestOutput``s as it does from the engine in a thread. The child exits when the server tells it to or when
the pipe closes (the server died); the server answers 503 from the moment the child is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any, Callable

from flare.engine import EngineConfig, QueueFull, RequestError, RequestOutput
from flare.engine.llm import Prompter
from flare.engine.sequence import Sequence
from flare.serve.async_engine import Channel, EngineFailed
from flare.serve.metrics import Tally, counts, snapshot

log = logging.getLogger("flare.serve")

QUIET = 0.1  # seconds: the longest the engine keeps a step's tally and gauges when no client waits for output
KERNELS_EVERY = 1.0  # seconds between reads of the kernel paths /metrics shows
LOAD_ERRORS = (FileNotFoundError, ModuleNotFoundError, ValueError)  # raised again as they are in the server


class EngineProcess:
    """Spawn the engine over ``model_dir`` and wait until it is ready (raises what loading raised). The same
    interface as ``AsyncEngine``: ``start`` (in the event loop), ``submit``, ``abort``, ``alive``, ``snapshot``,
    ``shutdown``; ``info`` holds what the child reported (``flare.serve.ready``'s, its modes and gauges)."""

    def __init__(self, model_dir: str | Path, *, device: str | None = None, dtype=None,
                 config: EngineConfig | None = None, threads: int | None = None, timeout: float = 900.0) -> None:
        self.model_dir, self.config = Path(model_dir), config or EngineConfig()
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: CUDA and OpenMP start fresh
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child, str(model_dir), device, dtype, self.config, threads),
                                   name="flare-engine", daemon=True)
        self.process.start()
        child.close()
        self.on_step: Callable[[Tally], None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: dict[int, tuple] = {}  # tag -> (future, channel, prompt_ids, params)
        self.live: dict[str, tuple[Channel, Sequence]] = {}  # request id -> (its channel, its mirror)
        self.dead: str | None = None  # why the engine cannot take requests any more
        self.stopping = False
        self._tags = itertools.count()
        self.info = self._wait_ready(timeout)
        self.gauges: dict[str, Any] = self.info["gauges"]

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.2):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "ready":
                    return msg[1]
                self.process.join(10)
                kind = next((c for c in LOAD_ERRORS if c.__name__ == msg[1]), RuntimeError)
                raise kind(msg[2])
            if not self.process.is_alive():
                break
        self._stop_process()
        raise RuntimeError(f"the engine process exited with code {self.process.exitcode} before it was ready"
                           if self.process.exitcode is not None else f"the engine was not ready in {timeout:.0f} s")

    def prompter(self) -> Prompter:
        """The text side for the app: the checkpoint's tokenizer, with the engine's name and modes."""
        from flare.data.tokenizers import ChatTokenizer

        d = self.model_dir
        tokenizer = ChatTokenizer.from_dir(d) if (d / "tokenizer.json").exists() else None
        return Prompter(tokenizer, self.config, self.info["modes"], name=d.name)

    # ------------------------------------------------------------------------------------------- event loop
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._readable)

    @property
    def alive(self) -> bool:
        return self.dead is None and self.process.is_alive()

    def snapshot(self) -> dict:
        return self.gauges

    async def submit(self, prompt_ids: list[int], params, mode, final_only: bool = False) -> tuple[str, Channel]:
        if self.dead is not None or self.stopping:
            raise EngineFailed(self.dead or "the server is shutting down")
        tag = next(self._tags)
        accepted, channel = asyncio.get_running_loop().create_future(), Channel()
        self.pending[tag] = (accepted, channel, list(prompt_ids), params)
        self._send(("add", tag, list(prompt_ids), params, mode, final_only))
        return await accepted, channel

    def abort(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None and self.dead is None:
            self._send(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        """Forget the kept prompt beginnings (the child reads commands in order: before later requests)."""
        if self.dead is None:
            self._send(("reset_prefix_cache",))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests still in flight are aborted and told so."""
        self.stopping = True
        if self.dead is None:
            self._send(("stop",))
        self._stop_process(timeout)
        self._end("the server is shutting down")

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):  # the pipe is closed: the child has gone
            self._gone()

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._gone()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, deliveries, tally, self.gauges = msg
            if self.on_step is not None:
                self.on_step(tally)
            for rid, new, reason, forwards, drafted, accepted, output_ids in deliveries:
                entry = self.live.get(rid)
                if entry is None:  # aborted here while the engine stepped it
                    continue
                channel, seq = entry
                if output_ids is not None:
                    seq.output_ids = output_ids
                    del self.live[rid]
                else:
                    seq.output_ids += new
                seq.forwards, seq.drafted, seq.accepted, seq.finish_reason = forwards, drafted, accepted, reason
                channel.put(RequestOutput(rid, new, reason is not None, reason, seq))
        elif kind == "added":
            _, tag, rid, options = msg
            fut, channel, prompt_ids, params = self.pending.pop(tag)
            if fut.cancelled():  # the caller has gone
                self._send(("abort", rid))
                return
            self.live[rid] = (channel, Sequence(rid, prompt_ids, params.max_new_tokens, options, params))
            fut.set_result(rid)
        elif kind == "refused":
            _, tag, why, message = msg
            fut = self.pending.pop(tag)[0]
            if not fut.cancelled():
                fut.set_exception({"request": RequestError, "queue_full": QueueFull}.get(why, EngineFailed)(message))
        elif kind == "failed":
            for channel, _ in self.live.values():
                channel.put(EngineFailed(msg[1]))
            self.live.clear()

    def _gone(self) -> None:
        if self.dead is not None:
            return
        self.process.join(5)
        code = self.process.exitcode
        self.dead = "the server is shutting down" if self.stopping else \
            f"the engine process has exited (code {code}); restart the server"
        if not self.stopping:
            log.error("%s", self.dead)
        self._end(self.dead)

    def _end(self, message: str) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.remove_reader(self.conn.fileno())
            except (OSError, ValueError):
                pass
        self.dead = self.dead or message
        for fut, *_ in self.pending.values():
            if not fut.done():
                fut.set_exception(EngineFailed(message))
        for channel, _ in self.live.values():
            channel.put(EngineFailed(message))
        self.pending.clear()
        self.live.clear()

    def _stop_process(self, timeout: float = 10.0) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ------------------------------------------------------------------------------------------------ the child
def _child(conn, model_dir: str, device, dtype, config: EngineConfig, threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group: the server decides when to stop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s flare.engine: %(message)s")
    try:
        import torch

        from flare.device import prepare_process
        from flare.engine.llm import LLM
        from flare.serve import ready

        prepare_process()  # first, before torch starts its intra-op threads (flare.device)
        if threads:
            torch.set_num_threads(threads)
        llm = LLM.from_dir(model_dir, device=device, dtype=dtype, config=config)
        info = ready(llm, torch.get_num_threads())
        conn.send(("ready", {**info, "modes": llm.modes, "gauges": snapshot(llm.engine)}))
    except BaseException as e:  # noqa: BLE001 - the server reports it and exits
        kind = next((c.__name__ for c in LOAD_ERRORS if isinstance(e, c)), "RuntimeError")
        try:
            conn.send(("error", kind, str(e) or type(e).__name__))
        except OSError:
            pass
        return
    try:
        _Stepping(conn, llm.engine).run()
    except (EOFError, OSError):  # the server has gone
        pass


class _Stepping:
    """(child) Take the server's commands between steps; step while there is work; send what each step did."""

    def __init__(self, conn, engine) -> None:
        self.conn, self.engine = conn, engine
        # Every request in flight: request id -> only its final output is wanted.
        self.in_flight: dict[str, bool] = {}
        self.tally, self.sent, self.kernels_read = Tally(), time.monotonic(), 0.0
        self.gauges = snapshot(engine)
        self.aborted = False  # a request was aborted since the last report

    def run(self) -> None:
        engine, conn = self.engine, self.conn
        while True:
            if conn.poll(0 if engine.has_work else None) and not self._commands():
                return
            if self.aborted:  # the gauges change without a step: /metrics must not show the request still running
                self.aborted = False
                self._send([])
            if not engine.has_work:
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - every waiting client must hear of it
                log.exception("engine step failed; ending the requests in flight")
                for rid in list(self.in_flight):
                    engine.abort(rid)
                self.in_flight.clear()
                conn.send(("failed", f"engine step failed: {type(e).__name__}: {e}"))
                continue
            self._report(outputs)

    def _commands(self) -> bool:
        """Every command waiting; False on stop."""
        engine, conn = self.engine, self.conn
        while conn.poll(0):
            msg = conn.recv()
            if msg[0] == "add":
                _, tag, prompt_ids, params, mode, final_only = msg
                try:
                    seq = engine.add_request(prompt_ids, params, mode)
                except QueueFull as e:
                    conn.send(("refused", tag, "queue_full", str(e)))
                    continue
                except ValueError as e:  # RequestError, or a request the engine's checks let through
                    conn.send(("refused", tag, "request", str(e)))
                    continue
                self.in_flight[seq.request_id] = final_only
                conn.send(("added", tag, seq.request_id, seq.options))
            elif msg[0] == "abort":
                if self.in_flight.pop(msg[1], None) is not None:
                    self.aborted |= engine.abort(msg[1])
            elif msg[0] == "reset_prefix_cache":
                engine.reset_prefix_cache()
            elif msg[0] == "stop":
                for rid in list(self.in_flight):
                    engine.abort(rid)
                return False
        return True

    def _report(self, outputs: list[RequestOutput]) -> None:
        engine = self.engine
        self.tally.add(outputs, engine.stats.step_seconds)
        deliveries = []
        for out in outputs:
            seq, rid = out.sequence, out.request_id
            final_only = self.in_flight.get(rid)
            if out.finished:
                if self.in_flight.pop(rid, None) is not None:
                    deliveries.append((rid, out.new_token_ids, out.finish_reason, seq.forwards, seq.drafted,
                                       seq.accepted, list(seq.output_ids)))
            elif out.new_token_ids and final_only is False:
                deliveries.append((rid, out.new_token_ids, None, seq.forwards, seq.drafted, seq.accepted, None))
        if deliveries or time.monotonic() - self.sent > QUIET or not engine.has_work:
            self._send(deliveries)

    def _send(self, deliveries: list) -> None:
        """What the steps since the last report did, and the engine's gauges now."""
        engine, now = self.engine, time.monotonic()
        if now - self.kernels_read > KERNELS_EVERY:
            self.gauges = snapshot(engine)
            self.kernels_read = now
        else:
            self.gauges = {**counts(engine), "kernels": self.gauges["kernels"]}
        self.conn.send(("step", deliveries, self.tally, self.gauges))
        self.tally, self.sent = Tally(), now
