"""The OpenAI-compatible HTTP API over one model: completions, chat, models, health, metrics.

Only committed tokens are ever sent: each stream chunk carries the text of whatever tokens the engine committed
for the request in one step (several at once for AR-Trust and block-wise modes, or for several steps when the
event loop fell behind). A client that disconnects aborts its request, which frees its slot: one watcher task per
request waits for the disconnect, so nothing is asked per token. Errors are OpenAI-shaped ``{"error": {...}}``
bodies: 400 for a bad request, 404 for an unknown model, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from flare.engine import QueueFull, RequestError, RequestOutput
from flare.engine.llm import Prompter
from flare.serve.async_engine import AsyncEngine, Channel, EngineFailed
from flare.serve.metrics import Metrics
from flare.serve.protocol import ChatRequest, CompletionRequest

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(llm: Prompter, engine=None) -> FastAPI:
    """The app over ``llm``'s text side and ``engine``: an ``AsyncEngine`` or an ``EngineProcess``; None: the
    engine of ``llm`` (an ``LLM``) in a thread of this process."""
    aengine = engine if engine is not None else AsyncEngine(llm.engine)
    metrics = Metrics(aengine.snapshot)
    aengine.on_step = metrics.record

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        aengine.shutdown()

    app = FastAPI(title="flare-lm", lifespan=lifespan)
    app.state.llm, app.state.engine, app.state.metrics = llm, aengine, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.rejected.labels("invalid").inc()
        return _error(400, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.rejected.labels(exc.kind).inc()
        return _error(exc.status, exc.message, exc.kind)

    @app.get("/health")
    async def health():
        if not aengine.alive:
            return _error(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": llm.name, "object": "model", "created": 0, "owned_by": "flare",
            "modes": llm.modes,
            "default_mode": llm.config.default_mode,
        }]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Forget the kept prompt beginnings (vLLM's endpoint of that name): benchmarks start each run from none."""
        if not aengine.alive:
            return _error(503, "the engine is not running", "server_error")
        aengine.reset_prefix_cache()
        return {"reset": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = _guard(lambda: llm.prompt_ids(body.prompt))
        return await _respond(body, prompt, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = _guard(lambda: llm.chat_ids(messages))
        return await _respond(body, prompt, request, "chat")

    async def _respond(body, prompt: list[int], request: Request, kind: str):
        if body.model is not None and body.model != llm.name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {llm.name!r}",
                           "not_found_error")
        if body.stop and llm.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; this model has none")
        params = _guard(lambda: body.sampling(min(DEFAULT_MAX_TOKENS[kind], llm.config.max_new_tokens)))
        mode = _guard(lambda: body.mode(llm.config.default_options))
        final_only = not body.stream and not body.stop  # nothing to send or to watch before the end
        try:
            rid, channel = await aengine.submit(prompt, params, mode, final_only)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", "rate_limit_error") from None
        except EngineFailed as e:
            raise APIError(503, str(e), "server_error") from None
        metrics.prompt_tokens.inc(len(prompt))
        reply = _Reply(llm, body, kind, rid, len(prompt))
        events = _events(aengine, rid, channel, llm.stream(body.stop) if llm.tokenizer is not None else None,
                         request, final_only)
        if body.stream:
            return _EventStream(_sse(reply, events), media_type="text/event-stream")
        return await _collect(reply, events)

    return app


def _guard(fn):
    """Run fn, turning refusals of the input into 400s."""
    try:
        return fn()
    except (RequestError, ValueError) as e:
        raise APIError(400, str(e)) from None


class ClientGone(Exception):
    """The client disconnected; its request has been aborted."""


_GONE = object()  # put in a request's channel by its watcher


async def _watch(request: Request, aengine, rid: str, channel: Channel) -> None:
    """Wait for the client to disconnect, then abort its request and end its output."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    aengine.abort(rid)
    channel.put(_GONE)


async def _events(aengine, rid: str, channel: Channel, stream, request: Request,
                  final_only: bool = False) -> AsyncIterator[tuple]:
    """(text delta, new ids, finished, finish reason, sequence) per step that committed something for the
    request, several steps merged when they were waiting together (``final_only``: one event, every token).
    Raises ClientGone when the client leaves and EngineFailed when the engine cannot go on; a request left
    unfinished is aborted."""
    watcher = asyncio.ensure_future(_watch(request, aengine, rid, channel))
    finished, pending = False, []
    try:
        while True:
            if not pending:
                pending = await channel.get()
            if pending[0] is _GONE:
                raise ClientGone()
            if isinstance(pending[0], Exception):
                raise pending[0]
            n = 1
            while n < len(pending) and isinstance(pending[n], RequestOutput) and not pending[n - 1].finished:
                n += 1
            batch, pending = pending[:n], pending[n:]
            last = batch[-1]
            if final_only:
                new = list(last.sequence.output_ids)
            else:
                new = batch[0].new_token_ids if n == 1 else [t for out in batch for t in out.new_token_ids]
            delta = stream.push(new, last.finished) if stream is not None else ""
            stopped = stream is not None and stream.stopped
            if stopped and not last.finished:
                aengine.abort(rid)
            finished = last.finished or stopped
            yield delta, new, finished, "stop" if stopped else last.finish_reason, last.sequence
            if finished:
                return
    finally:
        watcher.cancel()
        if not finished:
            aengine.abort(rid)


class _Reply:
    """Builds the OpenAI-shaped bodies of one request."""

    def __init__(self, llm: Prompter, body, kind: str, rid: str, prompt_tokens: int) -> None:
        self.llm, self.body, self.kind, self.prompt_tokens = llm, body, kind, prompt_tokens
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "text_completion" if kind == "completion" else "chat.completion"
        self._head: str | None = None

    def usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def flare(self, seq) -> dict[str, Any]:
        return {"mode": seq.mode, "options": seq.options.given(), "forwards": seq.forwards, "drafted": seq.drafted, "accepted": seq.accepted,
                "tokens_per_forward": len(seq.output_ids) / seq.forwards if seq.forwards else 0.0}

    def full(self, text: str, ids: list[int], reason: str, seq) -> dict[str, Any]:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "token_ids": ids}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason, "token_ids": ids}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.llm.name,
                "choices": [choice], "usage": self.usage(len(ids)), "flare": self.flare(seq)}

    def chunk(self, text: str | None, ids: list[int], reason: str | None, first: bool = False) -> bytes:
        """One server-sent event, written out directly (json.dumps would walk a dict of dicts per step); the
        constant head is encoded once per request."""
        if self._head is None:
            obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
            head = json.dumps({"id": self.id, "object": obj, "created": self.created, "model": self.llm.name})
            self._head = "data: " + head[:-1] + ', "choices": [{"index": 0, '
        if self.kind == "completion":
            body = '"text": ' + _json_str(text or "")
        else:
            parts = ['"role": "assistant"'] if first else []
            if text:
                parts.append('"content": ' + _json_str(text))
            body = '"delta": {' + ", ".join(parts) + "}"
        why = "null" if reason is None else _json_str(reason)
        return (f'{self._head}{body}, "logprobs": null, "finish_reason": {why}, '
                f'"token_ids": [{", ".join(map(str, ids))}]}}]}}\n\n').encode()


async def _collect(reply: _Reply, events) -> Response:
    text, ids, reason, seq = [], [], "abort", None
    try:
        async for delta, new, finished, why, seq in events:
            text.append(delta)
            ids += new
            if finished:
                reason = why
                break
    except ClientGone:
        return Response(status_code=499)
    except EngineFailed as e:
        return _error(503, str(e), "server_error")
    finally:
        await events.aclose()
    # A JSONResponse as it is: FastAPI would otherwise walk the body through jsonable_encoder.
    return JSONResponse(reply.full("".join(text), list(seq.output_ids) if seq is not None else ids, reason, seq))


async def _sse(reply: _Reply, events) -> AsyncIterator[bytes]:
    try:
        if reply.kind == "chat":
            yield reply.chunk(None, [], None, first=True)
        n = 0
        async for delta, new, finished, why, seq in events:
            n += len(new)
            if delta or new or finished:
                yield reply.chunk(delta, new, why if finished else None)
            if finished and (reply.body.stream_options or {}).get("include_usage"):
                yield _data({"id": reply.id, "object": reply.object, "created": reply.created,
                             "model": reply.llm.name, "choices": [], "usage": reply.usage(n),
                             "flare": reply.flare(seq)})
        yield b"data: [DONE]\n\n"
    except ClientGone:
        return
    except EngineFailed as e:
        yield _data({"error": {"message": str(e), "type": "server_error", "param": None, "code": 503}})
    finally:
        await events.aclose()


class _EventStream(StreamingResponse):
    """Server-sent events, one send per chunk. Unlike StreamingResponse it runs no disconnect listener of its
    own: the request's watcher (``_watch``) hears the client leave and ends the stream."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await self.body_iterator.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_json_str = json.encoder.encode_basestring_ascii  # a JSON string literal, as json.dumps writes one


def _data(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
