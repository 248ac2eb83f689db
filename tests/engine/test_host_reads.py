"""At most one host read per engine step: every value the host needs comes back in the stepper's one sync.

A read is any call that copies device values to Python: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``bool/int/float(tensor)`` and a tensor used as an index. On a GPU each one stalls the pipeline, so they are
counted here on the CPU, where the code paths are the same.
"""

from __future__ import annotations

import random

import pytest
import torch

from flare.decoding import SamplingParams, make_options
from flare.engine import Engine, EngineConfig, decode

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
MIXED = [("causal", {}), ("ar_trust", {}), ("ar_trust", {"gen_block": 3, "draft_policy": "argmax_full_verify"}),
         ("ar_trust", {"redraft": "every"}), ("ar_trust", {"redraft": "tree"}),
         ("diffusion_trust", {}), ("diffusion_trust", {"lookahead": 1}), ("low_confidence", {"block_size": 2}),
         ("llada", {"block_size": 4})]


@pytest.fixture
def count_reads(monkeypatch):
    counter = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def test_the_counter_sees_every_kind_of_read(count_reads):
    t = torch.tensor([1, 2])
    t.tolist(), t[0].item(), bool(t[0]), int(t[1]), float(t[1]), t.cpu(), t.numpy(), [0, 1, 2][t[0]]
    assert count_reads["n"] == 8


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_one_host_read_per_engine_step(flare_models, count_reads, temperature):
    model = flare_models["qwen3_5"]
    engine = Engine(model, EngineConfig(max_num_seqs=4))
    rng = random.Random(0)
    for i in range(10):  # more requests than slots: admissions and releases happen between steps
        mode, options = MIXED[i % len(MIXED)]
        params = SamplingParams(temperature=temperature, top_k=20 if i % 2 else 0, top_p=0.9 if i % 3 == 0 else 1.0,
                                max_new_tokens=rng.randrange(1, 12), seed=i)
        engine.add_request([rng.randrange(90) for _ in range(rng.randrange(1, 9))], params,
                           make_options(mode, options))
    steps = 0
    while engine.has_work:
        before = count_reads["n"]
        engine.step()
        steps += 1
        assert count_reads["n"] - before <= 1, f"step {steps} read the device {count_reads['n'] - before} times"
    assert engine.stats.requests_finished == 10


def test_decode_reads_once_per_step(flare_models, count_reads):
    model = flare_models["llama"]
    out = decode(model, [[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_new_tokens=9), "ar_trust")
    # The prefill forward reads nothing; each later forward reads once.
    assert count_reads["n"] == out.forwards - 1
