"""The OpenAI-compatible server: ``flare serve MODEL_DIR`` (FastAPI + uvicorn over one engine).

``create_app(llm)`` builds the app (tests mount it on a live uvicorn server); ``serve(...)`` starts the engine in
a process of its own (``flare.serve.engine_process``; or in a thread of the server's), which loads the checkpoint
and warms the model up, logs what it serves and runs until SIGTERM/SIGINT, finishing the requests in flight.
"""

from __future__ import annotations

import logging
import os

from flare.engine import EngineConfig
from flare.engine.llm import LLM

log = logging.getLogger("flare.serve")


def create_app(llm, engine=None):
    """The app over ``llm`` (an ``LLM``, whose engine then runs in a thread, or a ``Prompter`` with ``engine``,
    e.g. an ``EngineProcess``)."""
    try:
        from flare.serve.app import create_app as build
    except ImportError as e:
        raise ModuleNotFoundError(f"the server needs its extra ({e.name} is missing): "
                                  "pip install 'flare-lm[serve]'") from e

    return build(llm, engine)


class ServerThread:
    """A live server on ``host`` (a free port by default) in a background thread: for tests, benchmarks and
    notebooks. ``stop()`` shuts it down as SIGTERM would."""

    def __init__(self, llm, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0, engine=None) -> None:
        import socket
        import threading
        import time

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.llm, self.host, self.port = llm, host, port
        self.app = create_app(llm, engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="flare-http", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# Compiled decoding (FLARE_COMPILE): the tokens each warm-up request decodes.
COMPILE_WARMUP_TOKENS = 24


def warm_up(llm: LLM) -> dict[str, str]:
    """One tiny request through the engine (and the chat template compiled), so the first client does not pay
    for it; the kernel paths used. Where decoding is compiled, whole requests of the default mode (for a paced
    AR-Trust, each kind of round its pacer may run, pinned) and of causal decoding, in batches of each power of two
    up to the slots and a full batch with one more, until a batch compiles no graph (``flare.engine.compiled.
    warm_modes``): the graphs a server's first minutes would otherwise compile while clients wait (what the pacer
    learned on these made-up prompts is forgotten)."""
    import time

    from flare.decoding import SamplingParams, as_options
    from flare.engine.compiled import warm_modes, warms_up

    engine, model = llm.engine, llm.model
    engine.generate([[0]], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True), "causal")
    if warms_up(model) is not None:
        start, before = time.perf_counter(), model.compiles
        params = SamplingParams(temperature=0, max_new_tokens=COMPILE_WARMUP_TOKENS, ignore_eos=True)

        def run(n, form):
            prompts = [[1 + (i + j) % 7 for j in range(5 + i % 4)] for i in range(n)]
            engine.generate(prompts, params, form)

        warm_modes(model, [as_options(engine.config.default_mode), as_options("causal")], engine.config.max_num_seqs,
                   run)
        engine.stepper.forget_pacing()
        log.info("compiled decoding (%s): %d forwards compiled a graph in %.0f s of warm-up", warms_up(model),
                 model.compiles - before, time.perf_counter() - start)
    if llm.tokenizer is not None:
        llm.chat_ids([{"role": "user", "content": "1+1="}])
    return model.kernel_paths()


def ready(llm: LLM, threads: int) -> dict:
    """Warm ``llm`` up (``warm_up``) and say what is served, as ``serve`` logs it: family, layers, vocabulary,
    device and dtype, intra-op ``threads``, kernel paths."""
    from flare.device import describe

    kernels, m = warm_up(llm), llm.model
    return {"family": m.config.family, "layers": m.config.num_hidden_layers, "vocab": m.config.vocab_size,
            "device": describe(m.device, m.dtype, m), "threads": threads, "kernels": kernels}


def leave_a_core(device) -> int:
    """On the CPU, let the engine's intra-op threads leave one core to the event loop and the HTTP work; returns
    the number of threads the engine then uses. An OpenMP team that shares every core with a busy thread waits
    at each of a step's barriers for whichever member the OS has preempted: on 2 cores the engine's steps ran
    2.7x slower under `flare serve` than in process. An explicit OMP_NUM_THREADS is left as it is."""
    import torch

    if getattr(device, "type", str(device)) != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores > 1 and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)
    return torch.get_num_threads()


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, config: EngineConfig | None = None,
          device: str | None = None, dtype=None, graceful_timeout: float = 30.0, engine: str = "process") -> None:
    """Serve ``model_dir`` until SIGTERM/SIGINT. ``engine``: "process" (the engine in a process of its own,
    with every core's threads) or "thread" (in this process, leaving a core to the event loop)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ModuleNotFoundError("the server needs its extra: pip install 'flare-lm[serve]'") from e

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine == "process":
        from flare.serve.engine_process import EngineProcess

        backend = EngineProcess(model_dir, device=device, dtype=dtype, config=config)
        front, info = backend.prompter(), backend.info
    elif engine == "thread":
        front, backend = LLM.from_dir(model_dir, device=device, dtype=dtype, config=config), None
        info = ready(front, leave_a_core(front.model.device))
    else:
        raise ValueError(f"engine must be 'process' or 'thread', got {engine!r}")
    cfg = front.config
    log.info("model %s: %s, %d layers, vocab %d, running on %s, %d intra-op threads in %s", front.name,
             info["family"], info["layers"], info["vocab"], info["device"], info["threads"],
             "a process of its own" if engine == "process" else "a thread of the server's process")
    log.info("modes %s (default %s); max_num_seqs %d, max_waiting %d", ", ".join(front.modes), cfg.default_mode,
             cfg.max_num_seqs, cfg.max_waiting)
    log.info("kernel paths: %s", ", ".join(f"{k}={v}" for k, v in sorted(info["kernels"].items())) or "n/a")
    uvicorn.run(create_app(front, backend), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=graceful_timeout)
