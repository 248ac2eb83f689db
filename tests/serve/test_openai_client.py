"""The official openai client against a live server: every mode, streamed == not streamed, batch invariance."""

from __future__ import annotations

import re

import concurrent.futures as cf
import random

import pytest

openai = pytest.importorskip("openai")

from flare.decoding import SamplingParams, make_options  # noqa: E402
from flare.engine import decode  # noqa: E402

MODES = [("causal", {}), ("ar_trust", {}), ("ar_trust", {"gen_block": 3}), ("diffusion_trust", {}),
         ("low_confidence", {}), ("llada", {"block_size": 8, "steps": 4})]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _flare(mode, options):
    return {"flare": {"mode": mode, **options}, "top_k": 0}


@pytest.mark.parametrize("mode, options", MODES)
def test_completions_streamed_equals_whole_and_decode(server, client, mode, options):
    prompt = "12+34="
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body=_flare(mode, options))
    choice = whole.choices[0]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body=_flare(mode, options)))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason in ("stop", "length")
    streamed_ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    assert streamed_ids == choice.model_extra["token_ids"]
    # The same tokens as decoding the prompt directly.
    llm = server.llm
    ref = decode(llm.model, [llm.prompt_ids(prompt)], SamplingParams(temperature=0, max_new_tokens=12),
                 make_options(mode, options))
    assert choice.model_extra["token_ids"] == ref.token_ids[0]
    assert whole.usage.completion_tokens == len(ref.token_ids[0])
    # The reply says how the request ran: the options given, the rest filled from the checkpoint.
    assert whole.model_extra["flare"]["mode"] == mode
    assert whole.model_extra["flare"]["options"] == ref.options.given()
    assert options.items() <= ref.options.given().items()


@pytest.mark.parametrize("mode", ["causal", "ar_trust", "diffusion_trust"])
def test_chat_streamed_equals_whole(client, mode):
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                           extra_body=_flare(mode, {}))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=_flare(mode, {})))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].message.role == "assistant"


def test_seeded_sampling_is_reproducible_and_the_seed_matters(server, client):
    # Full-vocabulary sampling at T=1 over 16 tokens (no EOS stop) on the tiny random model: two seeds give the
    # same tokens with negligible probability, one seed gives the same tokens every time.
    def sample(seed):
        r = client.completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=1.0, seed=seed,
                                      extra_body={"flare": {"mode": "ar_trust"}, "top_k": 0, "ignore_eos": True})
        return r.choices[0].model_extra["token_ids"], r.choices[0].text

    first, again, other = sample(3), sample(3), sample(4)
    assert first == again
    assert len(first[0]) == len(other[0]) == 16 and first[0] != other[0]
    # And the seed means what it means in the library: the same tokens as decoding the prompt with that seed.
    llm = server.llm
    ref = decode(llm.model, [llm.prompt_ids("hello")],
                 SamplingParams(temperature=1.0, top_k=0, max_new_tokens=16, seed=3, ignore_eos=True), "ar_trust")
    assert first[0] == ref.token_ids[0]


def test_a_request_alone_equals_it_among_concurrent_mixed_ones(server, client):
    rng = random.Random(0)
    jobs = []
    for i in range(12):
        mode, options = MODES[i % len(MODES)]
        prompt = "".join(rng.choice("0123456789+=") for _ in range(rng.randrange(1, 15)))
        jobs.append((prompt, rng.randrange(2, 20), mode, options))

    def run(job):
        prompt, n, mode, options = job
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body=_flare(mode, options))
        return r.choices[0].model_extra["token_ids"]

    alone = [run(j) for j in jobs]
    with cf.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert server.idle()


def test_models_health_and_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and "ar_trust" in models[0].model_extra["modes"]
    assert server.get("/health")[0] == 200
    client.completions.create(model="tiny", prompt="1", max_tokens=4, temperature=0,
                              extra_body={"flare": {"mode": "ar_trust"}})
    status, body = server.get("/metrics")
    text = body.decode()
    assert status == 200
    for name in ("flare_requests_total", "flare_generated_tokens_total", "flare_tokens_per_forward",
                 "flare_draft_acceptance_rate", "flare_queue_depth", "flare_step_seconds_bucket",
                 "flare_kernel_path_info", "flare_prefix_cache_tokens"):
        assert name in text, name
    assert 'flare_requests_total{mode="ar_trust"' in text
    # Latency histograms per mode, as vLLM has them: each request adds a first output, and a causal one of 12
    # tokens (at most 2 in its first output) tokens after it. (The server serves other tests too: counts grow.)
    def count(name: str, mode: str) -> float:
        found = re.search(rf'{name}_count{{mode="{mode}"}} ([0-9.]+)', server.get("/metrics")[1].decode())
        return float(found.group(1)) if found else 0.0

    assert count("flare_time_to_first_token_seconds", "ar_trust") >= 1
    before = [count(n, "causal") for n in ("flare_time_to_first_token_seconds", "flare_time_per_output_token_seconds")]
    client.completions.create(model="tiny", prompt="1", max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True, "flare": {"mode": "causal"}})
    after = [count(n, "causal") for n in ("flare_time_to_first_token_seconds", "flare_time_per_output_token_seconds")]
    assert after == [b + 1 for b in before]
