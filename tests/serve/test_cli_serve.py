"""`flare serve` as users run it: start-up log, a live request, graceful SIGTERM that finishes it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_logs_answers_and_shuts_down_gracefully(tiny_dirs, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flare", "serve", str(tiny_dirs["llama"]), "--port", str(port),
                             "--max-num-seqs", "4"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, open(tmp_path / "serve.log").read()
            time.sleep(0.2)

        # A stream long enough to be still decoding when SIGTERM arrives: the signal is sent as soon as its first
        # chunk has been read, with most of its tokens still to come.
        n_tokens = 1500
        result: dict = {"lines": []}
        first_chunk = threading.Event()

        def long_stream():
            try:
                body = json.dumps({"prompt": "1+2=", "max_tokens": n_tokens, "ignore_eos": True, "stream": True,
                                   "temperature": 0}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    for line in iter(r.readline, b""):
                        result["lines"].append(line)
                        if line.startswith(b"data: {"):
                            first_chunk.set()
            finally:
                first_chunk.set()  # never leave the main thread waiting on a failed request

        t = threading.Thread(target=long_stream)
        t.start()
        assert first_chunk.wait(120) and result["lines"], open(tmp_path / "serve.log").read()
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert not t.is_alive()
        # uvicorn finishes the requests in flight, then re-raises the signal: the usual exit status of SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        body = b"".join(result["lines"])
        assert body.rstrip().endswith(b"data: [DONE]")  # the request in flight was finished
        chunks = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == n_tokens
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(tmp_path / "serve.log").read()
    assert "modes causal" in text and "kernel paths:" in text and "max_num_seqs 4" in text, text
    assert "Finished server process" in text, text
    # The stream's connection was still open when the server began to shut down (uvicorn says so only then).
    assert text.index("Waiting for connections to close") > text.index("Shutting down"), text
