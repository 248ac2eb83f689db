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

        result = {}

        def long_stream():
            body = json.dumps({"prompt": "1+2=", "max_tokens": 60, "ignore_eos": True, "stream": True,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                result["body"] = r.read()

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        # uvicorn finishes the requests in flight, then re-raises the signal: the usual exit status of SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert result["body"].rstrip().endswith(b"data: [DONE]")  # the request in flight was finished
        chunks = [json.loads(line[6:]) for line in result["body"].decode().splitlines()
                  if line.startswith("data: {")]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 60
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(tmp_path / "serve.log").read()
    assert "modes causal" in text and "kernel paths:" in text and "max_num_seqs 4" in text, text
    assert "Finished server process" in text, text
