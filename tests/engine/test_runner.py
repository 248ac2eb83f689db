"""The cached runner == the cache-free reference through narrowed forwards, kept commits, settles and resets."""

from __future__ import annotations

import copy

import pytest
import torch

from flare.engine.reference import ReferenceRunner
from flare.engine.runner import CachedRunner
import flare.ops.gated_delta.pending as pending


@pytest.mark.parametrize("kept,apart", [(True, False), (False, False), (True, True), (False, True)])
def test_kept_commits_through_narrowed_rounds_resets_and_causal_steps(flare_models, kept, apart, monkeypatch):
    """Rounds of rows over the first n of 3 slots, each committing a random prefix of 4 clean rows: the kept
    commits outgrow their room (a settle before narrowing), narrowed rounds alone fill it again before a causal
    step on fewer slots writes them, a slot is handed to a new prompt; every forward's rows equal the
    reference's (float64: to round-off). Also with every commit written at once (states below
    ``KEEP_MIN_STATE_BYTES``, as the tiny model's are unless the bound is lowered), and with prefills whose
    idle slots run apart (``COMPACT_ROWS``: the first one, of ragged prompts, stays whole)."""
    import flare.engine.runner as runner

    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0 if kept else 1 << 62)
    monkeypatch.setattr(runner, "COMPACT_ROWS", 1 if apart else 1 << 30)
    model = copy.deepcopy(flare_models["qwen3_5"]).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    cached, ref = CachedRunner(model, 3, 16), ReferenceRunner(model, 3)

    def both(call, *args, only=slice(None), **kwargs):
        a, b = getattr(cached, call)(*args, **kwargs), getattr(ref, call)(*args, **kwargs)
        if a is not None:
            torch.testing.assert_close(a[only], b[only], rtol=1e-9, atol=1e-9)

    both("prefill", [torch.randint(0, 90, (n,), generator=gen).tolist() for n in (5, 9, 3)])
    settled = []
    for r, n in enumerate([3, 2, 3, 1, 2, 2, 1, 2, 3, 3, 2, 3]):
        if r == 10:  # slot 2 starts a new sequence
            both("reset", [2])
            both("prefill", [[], [], torch.randint(0, 90, (4,), generator=gen).tolist()], only=2)
        if r in (7, 9):  # a causal step on the first two slots (the kept commits are written first)
            both("append", torch.randint(0, 90, (2, 1), generator=gen))
        tokens = torch.cat([torch.randint(0, 90, (n, 4), generator=gen), torch.full((n, 2), 95)], 1)
        clean, noisy = torch.full((n,), 4), torch.full((n,), 2)
        both("rows", tokens, clean, noisy, record=True, clean_rows=4)
        settled.append((cached.cache.pending_room() < 4, n))
        both("commit_recorded", torch.randint(1, 5, (n,), generator=gen))
        torch.testing.assert_close(cached.lengths(), ref.lengths())
    # The room ran out (a settle of all slots before a narrowed commit) at least once; or there is none.
    assert any(full and n < 3 for full, n in settled) if kept else cached.cache.pending_room() == 0


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_a_prefill_in_pieces_equals_the_reference(flare_models, family, monkeypatch):
    """Ragged prompts (one empty) prefilled in pieces of 64 tokens a sequence (the CPU's bound lowered to 256
    tokens a forward) give the reference's logits, and the caches then decode as the reference does."""
    import flare.engine.runner as runner

    monkeypatch.setattr(runner, "CPU_PREFILL_TOKENS", 256)
    assert runner.prefill_piece(4, 150, torch.device("cpu")) == 64  # 256 // 4 tokens a sequence
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runner.prefill_piece(4, 150, cuda) == runner.prefill_piece(1, 150, cpu) == 150
    model = copy.deepcopy(flare_models[family]).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    cached, ref = CachedRunner(model, 4, 256), ReferenceRunner(model, 4)
    prompts = [torch.randint(0, 90, (n,), generator=gen).tolist() if n else [] for n in (150, 70, 0, 129)]
    a, b = cached.prefill(prompts), ref.prefill(prompts)
    torch.testing.assert_close(a[[0, 1, 3]], b[[0, 1, 3]], rtol=1e-9, atol=1e-9)
    for _ in range(3):
        step = torch.randint(0, 90, (4, 1), generator=gen)
        torch.testing.assert_close(cached.append(step), ref.append(step), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cached.lengths(), ref.lengths())


def test_decoding_runs_in_inference_mode_and_leaves_training_tensors(flare_models):
    """Every forward of a decode runs under ``torch.inference_mode`` (cheaper ops), and the tables that ops keep
    across calls (RoPE, constants, chain masks) are normal tensors: a training step on the same model right after
    decoding runs its backward (autograd refuses inference tensors)."""
    from flare.decoding import SamplingParams
    from flare.engine import decode
    from flare.ops.gated_delta import rows

    model = copy.deepcopy(flare_models["qwen3_5"])
    modes = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    for mode in ("causal", "ar_trust:redraft=last:pause=0"):
        decode(model, [[3, 4, 5, 6], [7, 8]], params, mode)
    hook.remove()
    assert len(modes) > 4 and all(modes)
    assert not rows._after(4, torch.device("cpu")).is_inference()
    logits = model(torch.tensor([[3, 4, 5, 6, 7, 8, 9]]))
    logits.float().square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.model.embed_tokens.weight.grad is not None
