"""The harness through the engine: AR-Trust at T=0 agrees with causal exactly; throughput waves are exact."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest

from flare.data.tokenizers import ChatTokenizer
from flare.decoding import LowConfidenceOptions, SamplingParams, parse_mode, parse_modes
from flare.engine import EngineConfig, decode
from flare.engine.llm import LLM
from flare.eval import EngineTarget, EvalItem, HttpTarget, Task, evaluate, parse_targets, run_waves
from flare.eval.plots import accuracy_plot, throughput_plot
from flare.eval.report import accuracy_table, throughput_table


@pytest.fixture(scope="module")
def llm(flare_models, tiny_dirs):
    return LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
               EngineConfig(max_num_seqs=8), name="tiny")


def _task(llm, questions):
    """References = the causal answers, so causal scores 100% and any other mode scores its agreement."""
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompts = [llm.chat_ids([{"role": "user", "content": q}]) for q in questions]
    answers = [c.text for c in llm.generate(prompts, params)]
    return Task("echo", [EvalItem(q, a, lambda r, a=a: float(r == a)) for q, a in zip(questions, answers)]), params


def _alone(llm, questions, params, mode):
    """Each question's chat prompt decoded on its own by ``decode`` (no engine, no batch): per question, the
    new tokens and the forwards it took, and the drafts proposed and accepted, summed over the questions."""
    outs = [decode(llm.model, [llm.chat_ids([{"role": "user", "content": q}])], params, mode)
            for q in questions]
    return (sum(len(o.token_ids[0]) for o in outs), sum(o.forwards for o in outs), sum(o.drafted for o in outs),
            sum(o.accepted for o in outs))


def test_evaluate_modes(llm, tmp_path, monkeypatch):
    # Greedy AR-Trust rounds follow the clock (flare.decoding.pacer): one kind always, to compare forward counts.
    monkeypatch.setattr("flare.decoding.pacer.Pacer.next", lambda self, served, covered=None: self.kinds[0])
    monkeypatch.setattr("flare.decoding.pacer.Pacer.current", lambda self, covered: self.kinds[0])  # the prefill's
    questions = ["1+2", "30+4", "5+66", "7+8", "9+10", "11+12"]
    task, params = _task(llm, questions)
    report = evaluate(llm, task, parse_modes("ar_trust,causal,diffusion_trust"), params, progress=False)
    assert [r.mode for r in report.results] == ["causal", "ar_trust", "diffusion_trust"]
    causal, trust = report.result("causal"), report.result("ar_trust")
    assert causal.accuracy == 1.0 and causal.tokens_per_forward == 1.0
    assert trust.accuracy == 1.0 and trust.same_as_causal == 1.0
    # Token, forward and draft counts are those of decoding each question alone: tokens per forward is the new
    # tokens over the forwards each request took part in, acceptance is accepted over drafted.
    for result, mode in ((causal, "causal"), (trust, "ar_trust")):
        tokens, forwards, drafted, accepted = _alone(llm, questions, params, mode)
        assert result.new_tokens == tokens and result.tokens_per_forward == tokens / forwards, mode
    assert drafted > 0 and trust.acceptance == accepted / drafted
    table = accuracy_table(report)
    # Each row names the options as they ran: unset ones filled from the checkpoint's training block.
    assert trust.label == f"ar_trust:gen_block={llm.model.config.trained_block + 1}"
    assert f"| {trust.label} | 100.0% |" in table and "speed-up" in table
    # Mean latencies over the questions: to the first output, and per token after it (answers of several tokens).
    for result in (causal, trust):
        assert 0 < result.ttft < result.seconds and 0 < result.tpot < result.seconds
        assert f"| {1e3 * result.tpot:.1f} |" in table
    png = accuracy_plot(report, tmp_path / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # JSON keeps every value
    assert [(r["mode"], r["accuracy"], r["tokens_per_forward"], r["new_tokens"]) for r in as_dict["results"]] == [
        (r.mode, r.accuracy, r.tokens_per_forward, r.new_tokens) for r in report.results]
    assert causal.token_ids is None and causal.scores is None  # per-question outputs only when asked for
    kept = evaluate(llm, task, parse_modes("causal,ar_trust"), params, progress=False, keep_outputs=True)
    for r in kept.results:
        assert r.scores == [1.0] * len(questions) and len(r.token_ids) == len(r.responses) == len(questions)
        assert sum(map(len, r.token_ids)) == r.new_tokens
        assert r.new_tokens / sum(r.forwards) == r.tokens_per_forward
        assert r.responses == [llm.tokenizer.decode(ids) for ids in r.token_ids]
    assert kept.result("ar_trust").token_ids == kept.result("causal").token_ids


def test_ar_checkpoints_skip_parallel_modes(tiny_models, tiny_dirs):
    llm = LLM(tiny_models["llama"][0], ChatTokenizer.from_dir(tiny_dirs["llama"]), name="ar")
    task = Task("t", [EvalItem("1+1", "2", lambda r: 0.0)])
    report = evaluate(llm, task, parse_modes("causal,ar_trust"), SamplingParams(temperature=0, max_new_tokens=4),
                      progress=False)
    assert [r.mode for r in report.results] == ["causal"] and "flare convert" in report.not_run["ar_trust"]
    with pytest.raises(ValueError, match="unknown decoding mode 'fast'"):
        parse_modes("causal,fast")


def test_bench_targets_are_modes_or_the_server_default():
    assert parse_targets("server, causal,low_confidence:block_size=3") == [
        None, parse_mode("causal"), LowConfidenceOptions(block_size=3)]
    for bad, message in [("low_confidence:block_size", "not key=value"), ("low_confidence:=3", "not key=value"),
                         ("low_confidence:size=3", "takes options"), ("low_confidence:block_size=0", "block_size"),
                         ("", "no modes")]:
        with pytest.raises(ValueError, match=message):
            parse_targets(bad)
    with pytest.raises(ValueError, match="unknown decoding mode 'server'"):
        parse_modes("server")  # only flare bench knows the entry


def test_waves_in_process_and_over_http(llm, tmp_path):
    from tests.serve.conftest import LiveServer

    questions = ["1+1", "2+2", "3+3"]
    runs = [run_waves(EngineTarget(llm), questions, parse_mode(mode), c, max_tokens=7, waves=2)
            for mode in ("causal", "ar_trust") for c in (1, 3)]
    assert all(r.valid and r.tokens == r.concurrency * 2 * 7 for r in runs)
    # Tokens per forward of the measured waves (warm-up wave 0, then waves 1 and 2; wave i sends questions
    # i*C .. i*C+C-1, modulo 3) == tokens over forwards when each of those questions is decoded alone.
    exact = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)
    for run, mode, c in zip(runs, ("causal", "causal", "ar_trust", "ar_trust"), (1, 3, 1, 3)):
        sent = [questions[(w * c + j) % 3] for w in (1, 2) for j in range(c)]
        tokens, forwards, _, _ = _alone(llm, sent, exact, mode)
        assert tokens == run.tokens and run.tokens_per_forward == tokens / forwards, (mode, c)
    assert runs[0].tokens_per_forward == 1.0
    live = LiveServer(llm)
    try:
        http = run_waves(HttpTarget(live.base_url), questions, parse_mode("ar_trust"), 2, max_tokens=5, waves=1)
        foreign = run_waves(HttpTarget(live.base_url, "tiny"), questions, None, 2, max_tokens=5, waves=1)
        peer_mode = LowConfidenceOptions(block_size=2)
        peer = run_waves(HttpTarget(live.base_url), questions, peer_mode, 2, max_tokens=5, waves=1)
        reply = HttpTarget(live.base_url).chat(questions[0], peer_mode, 5)  # the options reach the server
        defaults = HttpTarget(live.base_url).chat(questions[0], parse_mode("low_confidence"), 5)
    finally:
        live.stop()
    assert reply["flare"]["mode"] == "low_confidence" and reply["flare"]["options"] == {"block_size": 2}
    assert defaults["flare"]["options"] == {"block_size": llm.model.config.trained_block}  # from the checkpoint
    assert peer.valid and peer.mode == "low_confidence:block_size=2"
    assert "| low_confidence:block_size=2 | 2 |" in throughput_table(runs + [peer])
    assert http.valid and http.tokens == 10
    tokens, forwards, _, _ = _alone(llm, [questions[2], questions[0]],  # wave 1 of C=2
                                    SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True), "ar_trust")
    assert http.tokens_per_forward == tokens / forwards  # from the server's own per-request forward counts
    assert foreign.valid and foreign.mode == "server default"
    table = throughput_table(runs + [http])
    assert "vs causal" in table and "| ar_trust | 3 |" in table
    assert throughput_plot(runs, tmp_path / "t.png").exists()


def test_sampled_waves_send_their_temperature_and_say_so(llm, monkeypatch):
    """A target with a temperature samples every request (unseeded, as a client's default request does), in the
    engine and over HTTP; the run records it and the table says so. Greedy stays the default."""
    from tests.serve.conftest import LiveServer

    seen = []
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, params, mode: seen.append(params) or generate(
        self, prompts, params, mode))
    questions = ["1+1", "2+2"]
    engine = run_waves(EngineTarget(llm, temperature=0.8, top_p=0.9), questions, parse_mode("ar_trust"), 2,
                       max_tokens=4, waves=1)
    assert engine.valid and (engine.temperature, engine.top_p) == (0.8, 0.9)
    assert {(p.temperature, p.top_p, p.seed) for p in seen} == {(0.8, 0.9, None)}
    seen.clear()
    from flare.engine.engine import Engine

    add = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, ids, params, *a, **k: seen.append(params) or add(
        self, ids, params, *a, **k))
    live = LiveServer(llm)
    try:
        http = run_waves(HttpTarget(live.base_url, temperature=0.7), questions, parse_mode("causal"), 2, max_tokens=4,
                         waves=1)
        greedy = run_waves(HttpTarget(live.base_url), questions, parse_mode("causal"), 2, max_tokens=4, waves=1)
    finally:
        live.stop()
    assert http.valid and http.temperature == 0.7 and greedy.temperature == 0
    assert {(p.temperature, p.seed) for p in seen if p.max_new_tokens == 4} == {(0.7, None), (0.0, None)}
    assert "sampled requests (unseeded): temperature 0.8, top-p 0.9" in throughput_table([engine, greedy])
    assert "sampled" not in throughput_table([greedy])


def test_flare_eval_cli_on_a_gsm8k_file(tiny_dirs, tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\nnot json\n"
                    + json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "flare", "eval", "--model", str(tiny_dirs["qwen3_5"]), "--task",
                           str(path), "--modes", "causal", "--max-tokens", "4", "--json", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "line 2" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["questions"] == 2 and report["skipped_rows"] == [[2, "not JSON (Expecting value)"]]
    assert report["results"][0]["mode"] == "causal"
    assert (tmp_path / "out" / "accuracy_vs_tpf.png").exists()


def test_flare_bench_cli_samples_when_given_a_temperature(tiny_dirs, tmp_path):
    from flare.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_dirs["qwen3_5"]), "--modes", "causal", "--concurrency", "1",
                 "--max-tokens", "3", "--waves", "1", "--temperature", "0.8", "--top-p", "0.9", "--out", str(out)])
    (run,) = json.loads((out / "bench.json").read_text())
    assert code == 0 and run["valid"] and (run["temperature"], run["top_p"]) == (0.8, 0.9)


def test_waves_until_eos_time_the_answers_as_users_get_them(llm):
    """--until-eos: each completion ends at its EOS (max_tokens only caps it), in process and over HTTP; the
    tokens counted are those the same questions give decoded alone, and the table says what was measured."""
    from tests.serve.conftest import LiveServer

    questions = ["1+2", "30+4", "5+66"]
    sent = [questions[(1 * 2 + j) % 3] for j in range(2)]  # wave 1 of C=2
    # The random model never meets its EOS: make EOS a token its answer to the first question holds.
    model = copy.deepcopy(llm.model)
    first = decode(model, [llm.chat_ids([{"role": "user", "content": sent[0]}])],
                   SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)).token_ids[0]
    model.config.eos_token_id = first[5]
    llm = LLM(model, llm.tokenizer, EngineConfig(max_num_seqs=8), name="tiny")
    natural = SamplingParams(temperature=0, max_new_tokens=40)
    tokens, _, _, _ = _alone(llm, sent, natural, "causal")
    assert tokens < 2 * 40  # the premise: an answer ends at its EOS
    run = run_waves(EngineTarget(llm), questions, parse_mode("ar_trust"), 2, max_tokens=40, waves=1, until_eos=True)
    assert run.valid and run.until_eos and run.tokens == tokens
    assert f"until EOS: {tokens} tokens" in throughput_table([run])
    live = LiveServer(llm)
    try:
        http = run_waves(HttpTarget(live.base_url), questions, parse_mode("causal"), 2, max_tokens=40, waves=1,
                         until_eos=True)
    finally:
        live.stop()
    assert http.valid and http.tokens == tokens


def test_a_compiled_evaluation_times_no_compile(flare_models, tiny_dirs, monkeypatch):
    """With FLARE_COMPILE the untimed warm-up runs whole requests until they compile nothing: the timed run of each
    mode then waits for no graph (dynamo's eager backend here)."""
    import torch

    def make():
        return LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
                   EngineConfig(max_num_seqs=2), name="tiny")

    monkeypatch.delenv("FLARE_COMPILE", raising=False)
    task, params = _task(make(), ["1+1=", "2+2=", "3+3="])
    monkeypatch.setenv("FLARE_COMPILE", "eager")
    torch._dynamo.reset()
    llm = make()
    compiled = []
    generate = LLM.generate

    def timed(self, prompts, params, mode=None, stop=None, progress=None):
        before = self.model.compiles
        out = generate(self, prompts, params, mode, stop, progress)
        compiled.append((len(prompts), self.model.compiles - before))
        return out

    monkeypatch.setattr(LLM, "generate", timed)
    evaluate(llm, task, parse_modes("causal"), params, progress=False)
    assert compiled[-1] == (3, 0) and sum(n for _, n in compiled) > 0  # the warm-up compiled, the timed run not


def test_each_wave_run_starts_from_no_kept_prompt_beginnings(llm):
    """Runs one after another send the same questions: each (in process, and over HTTP through ``POST
    /reset_prefix_cache``) starts from an empty prefix cache, so that no mode finds the prompts of the one before."""
    from tests.serve.conftest import LiveServer

    questions = ["Please add these two numbers for me: 1 and 1", "Please add these two numbers for me: 2 and 2"]
    prefix = llm.engine.stepper.prefix
    target, seen = EngineTarget(llm), []
    wave = target.wave

    def counted(*args, **kwargs):
        seen.append(len(prefix.entries))
        return wave(*args, **kwargs)

    target.wave = counted
    for mode in ("causal", "ar_trust"):
        run_waves(target, questions, parse_mode(mode), 2, max_tokens=3, waves=1)
    assert len(seen) == 4 and seen[0] == seen[2] == 0 and seen[1] > 0 and seen[3] > 0  # (warm-up, measured) x 2
    live = LiveServer(llm)
    try:
        HttpTarget(live.base_url).chat(questions[0], None, 2)
        assert prefix.entries
        HttpTarget(live.base_url).reset()
        deadline = time.time() + 10
        while prefix.entries and time.time() < deadline:  # the engine thread takes it between its steps
            time.sleep(0.05)
        assert not prefix.entries
    finally:
        live.stop()
