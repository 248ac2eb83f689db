"""torchrun: two CPU ranks (gloo, FSDP2) reproduce the one-process run with the same global batch, and their
checkpoint loads, and resumes, in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import flare
from flare.train import checkpointing
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer
from tests.train._util import REPO, env, losses, metrics, step_dir, write_config

STEPS = 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def test_two_ranks_match_one_and_their_checkpoint_resumes_in_one(straight_run, tmp_path):
    # Global batch 4 either way: the straight run has batch_size 4 on one rank, this one 2 on each of 2 ranks.
    out = tmp_path / "out"
    cfg = {**straight_run.cfg, "out_dir": str(out), "batch_size": 2, "steps": STEPS, "save_every": STEPS}
    config = write_config(tmp_path / "train.yaml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "flare", "train", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]

    # Same loss sequence as the one-process run (fp32 sums in another order: ~1e-7 apart).
    two = losses(out)
    assert len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(straight_run.losses[:STEPS]), rtol=1e-5, atol=0)
    one_rows, two_rows = metrics(straight_run.out)[:STEPS], metrics(out)
    assert [m["tokens"] for m in two_rows] == [m["tokens"] for m in one_rows]  # the same rows were drawn
    # The gradient itself (pre-clip norm), which the losses alone would not pin down: clipping and Adam hide a
    # wrong gradient scale. Exact up to round-off at step 1; later steps inherit Adam-amplified round-off.
    norms = torch.tensor([m["grad_norm"] for m in two_rows]), torch.tensor([m["grad_norm"] for m in one_rows])
    torch.testing.assert_close(norms[0][0], norms[1][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-3, atol=0)
    for key in ("loss_diff", "loss_ar", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in two_rows]), torch.tensor([m[key] for m in one_rows]),
                                   rtol=1e-5, atol=0, msg=key)

    # The checkpoint written by rank 0 from the gathered shards is a complete, loadable model ...
    ckpt = step_dir(out, STEPS)
    assert checkpointing.checkpoints(out) == [ckpt]
    model = flare.load_model(ckpt)
    assert model.config.mask_token_id is not None
    # ... with full (not sharded) tensors: weights and optimizer moments have the model's shapes.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = torch.load(ckpt / checkpointing.TRAINER_FILE, weights_only=True)
    assert state["step"] == STEPS and state["sampler"]["steps"] == STEPS
    moments = state["optimizer"]["state"]
    assert moments and {k: tuple(v["exp_avg"].shape) for k, v in moments.items()} == \
        {k: shapes[k] for k in moments}
    assert set(moments) >= {k for k, p in model.named_parameters()}

    # One process resumes the two-rank run (batch 4 = the global batch) and continues as the straight run did.
    resumed_cfg = from_dict(TrainConfig, {**straight_run.cfg, "out_dir": str(out), "steps": STEPS + 2,
                                          "save_every": STEPS + 2})
    trainer = Trainer(resumed_cfg)
    assert trainer.step == STEPS
    torch.testing.assert_close(trainer.model.state_dict(), model.state_dict(), rtol=0, atol=0)
    history = trainer.run()
    assert [m["step"] for m in history] == [STEPS + 1, STEPS + 2]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in history]),
                               torch.tensor(straight_run.losses[STEPS:STEPS + 2]), rtol=1e-4, atol=0)
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 3))


def test_two_ranks_in_bf16_track_one_rank_in_bf16(straight_run, tmp_path):
    """bf16 under torchrun is FSDP2's mixed precision (bf16 gathers, fp32 reduction into fp32 shards); one process
    autocasts. Different roundings of the same computation: the losses agree to bf16 precision."""
    runs = {}
    for name, batch, launcher in (("one", 4, []), ("two", 2, ["-m", "torch.distributed.run", "--standalone",
                                                               "--nproc-per-node", "2"])):
        out = tmp_path / name
        cfg = {**straight_run.cfg, "out_dir": str(out), "batch_size": batch, "steps": 3, "save_every": 3,
               "bf16": True}
        cmd = [sys.executable, *launcher, "-m", "flare", "train", "--config",
               str(write_config(tmp_path / f"{name}.yaml", cfg))]
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[name] = losses(out)
    torch.testing.assert_close(torch.tensor(runs["two"]), torch.tensor(runs["one"]), rtol=1e-2, atol=0)
    assert runs["two"] != runs["one"]  # the mixed-precision policy is on: not the fp32 sums of the plain run
    ckpt = step_dir(tmp_path / "two", 3)
    state = torch.load(ckpt / checkpointing.TRAINER_FILE, weights_only=True)
    assert {v.dtype for v in flare.load_model(ckpt).state_dict().values()} == {torch.float32}
    assert all(v["exp_avg"].dtype == torch.float32 for v in state["optimizer"]["state"].values())
