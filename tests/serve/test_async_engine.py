"""The engine thread's hand-over to the event loop: one per step for all requests, outputs merged when the
consumer fell behind, a client that leaves aborted at once; and the intra-op threads `flare serve` leaves."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import time

import pytest

from flare.data.tokenizers import ChatTokenizer
from flare.decoding import SamplingParams
from flare.engine import EngineConfig, RequestOutput
from flare.engine.llm import LLM
from flare.engine.sequence import Sequence
from flare.serve import ServerThread, leave_a_core
from flare.serve import async_engine as ae
from flare.serve.app import ClientGone, _events


def test_channel_get_takes_everything_waiting_and_waits_when_empty():
    async def main():
        ch = ae.Channel()
        ch.put(1)
        ch.put(2)
        assert await ch.get() == [1, 2]
        later = asyncio.ensure_future(ch.get())
        await asyncio.sleep(0)
        assert not later.done()
        ch.put(3)
        assert await later == [3]

    asyncio.run(main())


def _output(rid, ids, finished=False):
    seq = Sequence(rid, [1], 64)
    return RequestOutput(rid, ids, finished, "length" if finished else None, seq)


class _Quiet:
    """A request whose client never leaves, and an engine that records aborts."""

    def __init__(self):
        self.aborted = []

    async def receive(self):
        await asyncio.Event().wait()

    def abort(self, rid):
        self.aborted.append(rid)


def test_outputs_waiting_together_become_one_event():
    async def main():
        quiet, ch = _Quiet(), ae.Channel()
        for ids, fin in (([5], False), ([6, 7], False), ([8], True)):
            ch.put(_output("r", ids, fin))
        events = [e async for e in _events(quiet, "r", ch, None, quiet)]
        assert [(e[1], e[2], e[3]) for e in events] == [([5, 6, 7, 8], True, "length")]
        assert quiet.aborted == []  # finished: nothing to abort

    asyncio.run(main())


def test_an_error_after_outputs_comes_after_their_tokens():
    async def main():
        quiet, ch = _Quiet(), ae.Channel()
        ch.put(_output("r", [5]))
        ch.put(ae.EngineFailed("boom"))
        got = []
        with pytest.raises(ae.EngineFailed):
            async for e in _events(quiet, "r", ch, None, quiet):
                got.append(e[1])
        assert got == [[5]] and quiet.aborted == ["r"]

    asyncio.run(main())


def test_a_client_that_leaves_ends_its_events_and_aborts_its_request():
    class Leaving(_Quiet):
        async def receive(self):
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def main():
        gone, ch = Leaving(), ae.Channel()
        with pytest.raises(ClientGone):
            async for _ in _events(gone, "r", ch, None, gone):
                pass
        assert "r" in gone.aborted

    asyncio.run(main())


def test_one_hand_over_per_step_for_every_request(flare_models, monkeypatch):
    calls = []
    real = ae._call
    monkeypatch.setattr(ae, "_call", lambda loop, fn, *args: (calls.append((fn, args)), real(loop, fn, *args)))
    llm = LLM(copy.deepcopy(flare_models["qwen3_5"]), None, EngineConfig(max_num_seqs=4))
    engine = ae.AsyncEngine(llm.engine)
    engine.start()

    async def one(prompt):
        _, ch = await engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), None)
        ids = []
        while True:
            for out in await ch.get():
                ids += out.new_token_ids
                if out.finished:
                    return ids

    async def main():
        return await asyncio.gather(*(one([1 + i, 2, 3]) for i in range(4)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert all(len(r) == 6 for r in results)
    batches = [args[0] for fn, args in calls if fn is ae._put_all]
    assert sum(len(out.new_token_ids) for b in batches for _, out in b) == 4 * 6  # every token went over
    assert len(batches) <= llm.engine.stats.steps  # at most one hand-over a step...
    assert max(len(b) for b in batches) == 4  # ...carrying the four requests' outputs together


def test_a_final_only_request_is_handed_its_end_alone(flare_models):
    """A whole (not streamed) reply without stop strings needs nothing before its end: its channel gets one
    output, the final one, whose sequence holds every committed token; a streamed one gets one per step."""
    llm = LLM(copy.deepcopy(flare_models["qwen3_5"]), None, EngineConfig(max_num_seqs=4))
    engine = ae.AsyncEngine(llm.engine)
    engine.start()
    params = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)

    async def one(final_only):
        _, ch = await engine.submit([4, 2, 9], params, None, final_only)
        got = []
        while not (got and got[-1].finished):
            got += await ch.get()
        return got

    async def main():
        return await asyncio.gather(one(True), one(False))

    try:
        whole, streamed = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(whole) == 1 and whole[0].finished
    assert len(streamed) > 1
    assert list(whole[0].sequence.output_ids) == [t for out in streamed for t in out.new_token_ids]


def test_flare_serve_leaves_a_core_to_the_http_side(monkeypatch):
    import torch

    threads = {"n": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(n=n))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert leave_a_core(torch.device("cuda")) == 2  # a GPU engine: the CPU threads are not its to take
    assert leave_a_core(torch.device("cpu")) == 1
    threads["n"] = 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # asked for: kept
    assert leave_a_core(torch.device("cpu")) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert leave_a_core(torch.device("cpu")) == 2  # one core: nothing to leave


def test_a_whole_reply_whose_client_leaves_is_aborted_at_once(flare_models, tiny_dirs):
    llm = LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
              EngineConfig(max_num_seqs=2, max_new_tokens=100_000), name="tiny")
    live = ServerThread(llm)
    try:
        body = json.dumps({"prompt": "1+2=", "max_tokens": 100_000, "ignore_eos": True, "temperature": 0})
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.time() + 30
        while llm.engine.num_running == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        sock.close()
        left = time.time()
        while llm.engine.has_work:
            assert time.time() - left < 2, "the request went on after its client left"
            time.sleep(0.01)
        assert llm.engine.stats.requests_aborted == 1 and llm.engine.free_slots == 2
    finally:
        live.stop()


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_chunks_are_the_json_they_stand_for(kind):
    from types import SimpleNamespace

    from flare.serve.app import _Reply

    reply = _Reply(SimpleNamespace(name='mo"del\u00e9'), None, kind, "r", 3)
    for text, ids, reason, first in [(None, [], None, True), ("", [1], None, False), ('a"b\\c\n\u4f60\U0001f642\x00',
                                     [5, 6, 7], None, False), ("x", [9], "length", False), (None, [], "stop", False)]:
        raw = reply.chunk(text, ids, reason, first)
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        got = json.loads(raw[6:])
        if kind == "completion":
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason, "token_ids": ids}
            obj = "text_completion"
        else:
            delta = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason, "token_ids": ids}
            obj = "chat.completion.chunk"
        assert got == {"id": reply.id, "object": obj, "created": reply.created, "model": 'mo"del\u00e9',
                       "choices": [choice]}
