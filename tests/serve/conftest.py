"""A live server on 127.0.0.1 (uvicorn in a thread) over a tiny FLARE checkpoint with a tokenizer."""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flare.data.tokenizers import ChatTokenizer  # noqa: E402
from flare.engine import EngineConfig  # noqa: E402
from flare.engine.llm import LLM  # noqa: E402
from flare.serve import ServerThread  # noqa: E402


class LiveServer(ServerThread):
    """``ServerThread`` with small HTTP helpers for the tests."""

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


@pytest.fixture(scope="module")
def server(flare_models, tiny_dirs):
    model = copy.deepcopy(flare_models["qwen3_5"])
    llm = LLM(model, ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
              EngineConfig(max_num_seqs=8, max_waiting=64, max_prompt_tokens=200, max_new_tokens=64), name="tiny")
    live = LiveServer(llm)
    yield live
    live.stop()
