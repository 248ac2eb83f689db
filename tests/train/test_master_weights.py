"""fp32 master weights: a bf16-stored checkpoint trains like its fp32 copy (a run without masters does not), is
saved back in bf16, and resumes exactly from the master kept in the resume state."""

from __future__ import annotations

import pytest
import torch

from flare.checkpoint import load_model, save_model
from flare.train import checkpointing
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer
from flare.testing.toy import toy_train_config
from tests.train._util import step_dir, weights

STEPS = 12
LOW_LR = {"lr": 1e-5, "warmup_steps": 1}


@pytest.fixture(scope="module")
def stored(toy, tmp_path_factory):
    """The toy FLARE checkpoint stored in bf16, and the same (bf16-representable) values stored in fp32."""
    root = tmp_path_factory.mktemp("stored")
    model = load_model(toy.flare, dtype=torch.bfloat16)
    save_model(model, root / "bf16", tokenizer_from=toy.flare)
    save_model(model.float(), root / "fp32", tokenizer_from=toy.flare)
    return root


def _config(toy, model, out, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, toy_train_config(model, toy.data, out, bf16=True, optim=LOW_LR, **overrides))


def _train(toy, stored, tmp_path, kind: str, **overrides) -> Trainer:
    out = tmp_path / f"{kind}-{overrides.get('fp32_master', True)}"
    trainer = Trainer(_config(toy, stored / kind, out, steps=STEPS, save_every=STEPS, **overrides))
    trainer.run()
    return trainer


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of weights whose bf16 value changed."""
    changed = sum(int((after[k].to(torch.bfloat16) != before[k].to(torch.bfloat16)).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def test_bf16_checkpoint_trains_like_its_fp32_copy(toy, stored, tmp_path):
    start = load_model(stored / "bf16").state_dict()
    from_bf16 = _train(toy, stored, tmp_path, "bf16")
    from_fp32 = _train(toy, stored, tmp_path, "fp32")
    # Both train fp32 parameters from the same values with the same bf16 compute: the same run.
    assert all(p.dtype == torch.float32 for p in from_bf16.model.parameters())
    torch.testing.assert_close(_params(from_bf16), _params(from_fp32), rtol=0, atol=0)
    moved = _moved(start, _params(from_bf16))

    # Without masters the bf16 weights round most lr-1e-5 updates away.
    plain = _train(toy, stored, tmp_path, "bf16", fp32_master=False)
    assert all(p.dtype == torch.bfloat16 for p in plain.model.parameters())
    moved_plain = _moved(start, _params(plain))
    assert moved > 0.2 and moved_plain < moved / 3, (moved, moved_plain)  # measured: 29% and 5% moved

    # Saved in the source's dtype (loadable by Hugging Face as it came), master in the resume state.
    ckpt = step_dir(from_bf16.out, STEPS)
    assert {v.dtype for v in weights(ckpt).values()} == {torch.bfloat16}
    master = torch.load(ckpt / checkpointing.TRAINER_FILE, weights_only=True)["master"]
    torch.testing.assert_close(master, _params(from_bf16), rtol=0, atol=0)
    assert {v.dtype for v in weights(step_dir(from_fp32.out, STEPS)).values()} == {torch.float32}
    assert "master" not in torch.load(step_dir(from_fp32.out, STEPS) / checkpointing.TRAINER_FILE,
                                      weights_only=True)


def test_resume_from_a_bf16_checkpoint_is_exact(toy, stored, tmp_path):
    straight = _train(toy, stored, tmp_path / "straight", "bf16")
    out = tmp_path / "resumed"
    Trainer(_config(toy, stored / "bf16", out, steps=STEPS // 2, save_every=STEPS // 2)).run()
    resumed = Trainer(_config(toy, stored / "bf16", out, steps=STEPS, save_every=STEPS // 2))
    assert resumed.step == STEPS // 2
    history = resumed.run()
    assert [m["step"] for m in history] == list(range(STEPS // 2 + 1, STEPS + 1))
    # The master, not the rounded bf16 weights, was restored: the run continues bit for bit.
    torch.testing.assert_close(_params(resumed), _params(straight), rtol=0, atol=0)


def test_activation_checkpointing_turns_on_from_the_row_length(make_config):
    cfg = from_dict(TrainConfig, make_config(steps=1))
    assert cfg.activation_checkpointing is None and cfg.row_tokens == 96 * 3  # clean + two views
    assert not cfg.checkpointing
    assert from_dict(TrainConfig, make_config(steps=1, checkpoint_from_tokens=288)).checkpointing
    assert from_dict(TrainConfig, make_config(steps=1, activation_checkpointing=True)).checkpointing
    long = from_dict(TrainConfig, make_config(steps=1, data={"train": [], "seq_len": 1536}))
    assert long.checkpointing and not from_dict(
        TrainConfig, make_config(steps=1, data={"train": [], "seq_len": 1536}, activation_checkpointing=False)
    ).checkpointing
