"""AR-Trust on a trained toy model: its drafts pass, and greedy output is still causal's, token for token."""

from __future__ import annotations

import json

import pytest
import torch

import flare
from flare.data import ChatTokenizer
from flare.decoding import ArTrustOptions, SamplingParams
from flare.engine import decode
from flare.testing.ties import divergences
from flare.testing.toy import toy_data, toy_flare_checkpoint, toy_train_config
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy hybrid trained for a few dozen FLARE steps on arithmetic chats (~20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("trained")
    model_dir = toy_flare_checkpoint(root / "flare")
    data = toy_data(root / "train.jsonl", 400, seed=0)
    cfg = toy_train_config(model_dir, data, root / "run", steps=60, save_every=60, batch_size=8,
                           optim={"lr": 0.003, "warmup_steps": 5})
    threads = torch.get_num_threads()
    Trainer(from_dict(TrainConfig, cfg)).run()
    torch.set_num_threads(threads)
    ckpt = root / "run" / "step-00000060"
    tok = ChatTokenizer.from_dir(ckpt)
    rows = [json.loads(line) for line in toy_data(root / "heldout.jsonl", 12, seed=7).read_text().splitlines()]
    prompts = [tok.encode(f"<|im_start|>user\n{r['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n")
               for r in rows]
    (end,) = tok.encode("<|im_end|>")
    return flare.load_model(ckpt), prompts, end


@pytest.mark.parametrize("gen_block", [2, 4, 6])
def test_ar_trust_on_a_trained_model_is_greedy_causal(trained, gen_block):
    model, prompts, _ = trained
    params = SamplingParams(temperature=0, max_new_tokens=40)
    causal = decode(model, prompts, params)
    if gen_block - 1 > model.config.block_size:  # more MASK rows than the training block: warned, still exact
        with pytest.warns(UserWarning, match="MASK rows in a row"):
            trust = decode(model, prompts, params, ArTrustOptions(gen_block=gen_block))
    else:
        trust = decode(model, prompts, params, ArTrustOptions(gen_block=gen_block))
    assert trust.token_ids == causal.token_ids
    # Trained drafts pass, so partial and full acceptances (and their commits) are both exercised; most often
    # for N = 4, whose N-1 = 3 MASK rows are exactly the training block (method §3).
    assert trust.accepted > 0
    if gen_block == 4:
        assert trust.accepted > 0.3 * trust.drafted and trust.tokens_per_forward > 1.2


@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_in_bf16_a_trained_model_still_decodes_causal_tokens(trained, redraft):
    """bf16 verify rows and causal steps differ in the last bits (tests/decoding/test_bf16.py); most of a trained
    model's greedy choices in its answers are far from ties, so AR-Trust's answers are causal's, token for token,
    up to the first near-tie, where either token is greedy (this toy, trained for 60 steps, has a few: top-3 logits
    3.828 / 3.812 / 3.812, a bf16 unit apart, two tokens before its turn's end). (Past the end of its turn a toy
    model's text is untrained: decoding stops at the end-of-turn token, as a server does.)"""
    import copy

    model, prompts, end = trained
    model = copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[end])
    causal = decode(model, prompts, params)
    trust = decode(model, prompts, params, ArTrustOptions(redraft=redraft))
    parted = divergences(model, prompts, causal.token_ids, trust.token_ids)
    assert all(tie for _, tie in parted) and len(parted) <= len(prompts) // 4, parted
    assert trust.accepted > 0.3 * trust.drafted
