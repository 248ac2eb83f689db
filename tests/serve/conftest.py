"""A live server on 127.0.0.1 (uvicorn in a thread) over a tiny FLARE checkpoint with a tokenizer."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flare.data.tokenizers import ChatTokenizer  # noqa: E402
from flare.engine import EngineConfig  # noqa: E402
from flare.engine.llm import LLM  # noqa: E402
from flare.serve import create_app  # noqa: E402


class LiveServer:
    def __init__(self, llm: LLM) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.llm = llm
        self.app = create_app(llm)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def idle(self, timeout: float = 20.0) -> bool:
        """Wait until the engine holds no request and every slot is free."""
        engine, deadline = self.llm.engine, time.time() + timeout
        while time.time() < deadline:
            if not engine.has_work and engine.free_slots == engine.config.max_num_seqs \
                    and not self.app.state.engine.queues:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(flare_models, tiny_dirs):
    model = copy.deepcopy(flare_models["qwen3_5"])
    llm = LLM(model, ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
              EngineConfig(max_num_seqs=8, max_waiting=64, max_prompt_tokens=200, max_new_tokens=64), name="tiny")
    live = LiveServer(llm)
    yield live
    live.stop()
