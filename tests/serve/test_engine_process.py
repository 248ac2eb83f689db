"""The engine in a process of its own (``flare serve``'s default): the same tokens as the engine in the server's
thread, refusals and metrics carried over the pipe, and a server that answers 503 (never hangs) once the
engine's process is gone."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flare.checkpoint import save_model  # noqa: E402
from flare.data.tokenizers import ChatTokenizer  # noqa: E402
from flare.decoding import SamplingParams  # noqa: E402
from flare.engine import EngineConfig  # noqa: E402
from flare.engine.llm import LLM  # noqa: E402
from flare.serve.engine_process import EngineProcess  # noqa: E402
from tests.serve.conftest import LiveServer  # noqa: E402

CONFIG = EngineConfig(max_num_seqs=4, max_waiting=64, max_prompt_tokens=200, max_new_tokens=64)


@pytest.fixture(scope="module")
def model_dir(flare_models, tiny_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("proc") / "tiny-flare"
    save_model(flare_models["qwen3_5"], path, tokenizer_from=tiny_dirs["qwen3_5"])
    return path


def _launch(model_dir) -> LiveServer:
    backend = EngineProcess(model_dir, config=CONFIG, threads=1)
    try:
        return LiveServer(backend.prompter(), engine=backend)
    except BaseException:
        backend.shutdown()
        raise


@pytest.fixture(scope="module")
def server(model_dir):
    live = _launch(model_dir)
    yield live
    live.stop()


def _sse(live, body) -> tuple[list[int], str, str]:
    req = urllib.request.Request(f"{live.base_url}/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    ids, text, reason = [], "", None
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return ids, text, "error: " + event["error"]["message"]
            choice = event["choices"][0]
            ids += choice["token_ids"]
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    return ids, text, reason


@pytest.mark.parametrize("mode", ["causal", "ar_trust", "diffusion_trust"])
def test_the_same_tokens_as_the_engine_in_process(server, model_dir, flare_models, tiny_dirs, mode):
    prompts = ["12+34=", "7+8=", "99+1=", "5+55="]
    llm = LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]), CONFIG)
    want = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), mode)
    for prompt, w in zip(prompts, want):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "flare": {"mode": mode}}
        status, whole = server.post("/v1/completions", body)
        assert status == 200, whole
        choice = whole["choices"][0]
        assert choice["token_ids"] == w.token_ids and choice["text"] == w.text
        assert whole["flare"]["mode"] == mode and whole["flare"]["forwards"] >= 1
        assert _sse(server, body) == (w.token_ids, w.text, "length")


def test_refusals_models_health_and_metrics_cross_the_pipe(server):
    status, body = server.post("/v1/completions", {"prompt": "1+1=", "max_tokens": 65})
    assert status == 400 and "above this server's limit 64" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"prompt": [5] * 201})
    assert status == 400 and "at most 200" in body["error"]["message"]
    status, raw = server.get("/v1/models")
    assert status == 200 and "ar_trust" in json.loads(raw)["data"][0]["modes"]
    assert server.get("/health") == (200, b'{"status":"ok"}')
    server.post("/v1/completions", {"prompt": "2+2=", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    deadline = time.time() + 5
    while True:  # the gauges follow the engine's last report
        metrics = server.get("/metrics")[1].decode()
        if "flare_running_requests 0.0" in metrics or time.time() > deadline:
            break
        time.sleep(0.05)
    assert 'flare_generated_tokens_total{mode="causal"}' in metrics
    assert "flare_running_requests 0.0" in metrics and 'flare_kernel_path_info{' in metrics
    assert 'flare_requests_total{mode="causal",outcome="length"}' in metrics


def test_a_dead_engine_process_ends_requests_in_flight_and_is_a_503(model_dir):
    live = _launch(model_dir)
    try:
        backend = live.app.state.engine
        pid = backend.process.pid
        body = {"prompt": "1+2=", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        assert live.post("/v1/completions", body)[0] == 200
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while live.get("/health")[0] != 503:
            assert time.time() < deadline, "the server did not notice its engine died"
            time.sleep(0.05)
        status, reply = live.post("/v1/completions", body)
        assert status == 503 and "engine process has exited" in reply["error"]["message"]
    finally:
        live.stop()
    assert not backend.process.is_alive()


def test_stop_ends_the_engine_process(model_dir):
    live = _launch(model_dir)
    backend = live.app.state.engine
    live.stop()
    assert not backend.process.is_alive() and backend.process.exitcode == 0


def test_a_checkpoint_that_cannot_load_is_the_loading_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineProcess(tmp_path / "missing", threads=1)


def test_a_stop_string_ends_the_request_in_the_engine_process(server, flare_models, tiny_dirs):
    """The server finds the stop string in the text and aborts the request across the pipe: the reply is cut
    before it, and the engine holds no request afterwards."""
    llm = LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]), CONFIG)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    text = llm.generate(["12+34="], params, "causal")[0].text
    stop = text[5:7]
    assert stop and stop in text
    body = {"prompt": "12+34=", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    status, whole = server.post("/v1/completions", body)
    assert status == 200 and whole["choices"][0]["finish_reason"] == "stop"
    assert whole["choices"][0]["text"] == text[:text.index(stop)]
    streamed = _sse(server, body)
    assert streamed[1:] == (text[:text.index(stop)], "stop")
    deadline = time.time() + 5
    while b"flare_running_requests 0.0" not in server.get("/metrics")[1]:
        assert time.time() < deadline, "the engine still holds the stopped request"
        time.sleep(0.05)


def test_kept_prompt_beginnings_are_reused_and_reset_across_the_pipe(server):
    """A prompt that extends an earlier one starts from its kept state (``flare_prefix_cache_tokens`` grows); after
    ``POST /reset_prefix_cache`` (vLLM's endpoint) the next one finds nothing kept."""
    def gauge(after: float | None = None) -> float:
        deadline = time.time() + 5
        while True:  # the gauges follow the engine's last report
            text = server.get("/metrics")[1].decode()
            value = float(re.search(r"^flare_prefix_cache_tokens ([0-9.e+]+)$", text, re.M).group(1))
            if after is None or value > after or time.time() > deadline:
                return value
            time.sleep(0.05)

    first = list(range(3, 43))
    body = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    assert server.post("/v1/completions", {**body, "prompt": first})[0] == 200
    start = gauge()
    assert server.post("/v1/completions", {**body, "prompt": first + [50, 51]})[0] == 200
    grown = gauge(after=start)
    assert grown >= start + len(first)
    status, reply = server.post("/reset_prefix_cache", {})
    assert status == 200 and reply == {"reset": True}
    assert server.post("/v1/completions", {**body, "prompt": first + [60, 61]})[0] == 200
    time.sleep(0.3)
    assert gauge() == grown
