"""Exact resume: a run SIGKILLed after its mid-run checkpoint and restarted with the same command reproduces the
straight run's losses and weights; a crash while writing a checkpoint leaves the previous one as the latest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

import flare
from flare.train import checkpointing
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer
from tests.train._util import REPO, env, losses, metrics, run, step_dir, train_cmd, weights, write_config

N = 8  # = conftest.STRAIGHT_STEPS
HALF = N // 2


def _logged_steps(out_dir) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return steps


def test_sigkill_then_resume_is_exact(straight_run, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "train.yaml", {**straight_run.cfg, "out_dir": str(out), "save_every": HALF})
    cmd = train_cmd(config)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    half = step_dir(out, HALF)
    deadline = time.monotonic() + 150
    try:
        # Kill once the step-HALF checkpoint is complete and a later step has been logged.
        while not ((half / checkpointing.DONE_FILE).exists() and max(_logged_steps(out), default=0) > HALF):
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no step-4 checkpoint within the time limit"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert checkpointing.checkpoints(out) == [half], "the kill must land before the last checkpoint"
    logged = _logged_steps(out)
    assert HALF < max(logged) < N

    run(cmd)  # the same command resumes

    # Steps 1..N each logged once (the lines past the checkpoint from the killed run were replaced) ...
    resumed = losses(out)
    assert len(resumed) == N
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight_run.losses), rtol=1e-6, atol=0)
    # ... and the final weights are the straight run's.
    a, b = weights(step_dir(out, N)), weights(step_dir(straight_run.out, N))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    # The optimizer state too (a resume that reset Adam would drift only slowly; this sees it at once).
    sa = torch.load(step_dir(out, N) / checkpointing.TRAINER_FILE, weights_only=True)
    sb = torch.load(step_dir(straight_run.out, N) / checkpointing.TRAINER_FILE, weights_only=True)
    assert sa["step"] == sb["step"] == N and sa["sampler"]["steps"] == sb["sampler"]["steps"] == N
    for k, v in sb["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa["optimizer"]["state"][k][name], v[name], rtol=1e-6, atol=1e-9)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["torch.save", "save_model"])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(make_config, tmp_path, monkeypatch, where):
    cfg = from_dict(TrainConfig, make_config(steps=6, save_every=3))
    out = tmp_path / "out"
    calls = []

    if where == "torch.save":
        real = torch.save

        def failing(obj, f, *args, **kwargs):
            calls.append(f)
            if len(calls) == 2:  # the second checkpoint: its weights are on disk, trainer.pt is not
                raise _Boom("disk full")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(checkpointing.torch, "save", failing)
    else:
        real = checkpointing.save_model

        def failing(model, path, **kwargs):
            calls.append(path)
            if len(calls) == 2:  # write part of the weights, then die
                (path / "model.safetensors").write_bytes(b"\0" * 100)
                raise _Boom("killed")
            return real(model, path, **kwargs)

        monkeypatch.setattr(checkpointing, "save_model", failing)

    trainer = Trainer(cfg)
    with pytest.raises(_Boom):
        trainer.run()
    assert len(calls) == 2
    first_try = metrics(out)
    assert [m["step"] for m in first_try] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()

    # Only the complete step-3 checkpoint is listed; nothing named step-* is half written.
    assert checkpointing.checkpoints(out) == [step_dir(out, 3)]
    assert [p.name for p in out.glob(f"{checkpointing.PREFIX}*")] == ["step-00000003"]
    model = flare.load_model(step_dir(out, 3))
    assert model.config.mask_token_id is not None
    # The training block travels with the checkpoint (decoders warn when they run longer MASK runs).
    assert model.config.block_size == cfg.objective.block_size
    assert (step_dir(out, 3) / "tokenizer.json").exists()

    # A new trainer resumes from it and redoes steps 4..6 exactly as the first attempt did.
    trainer = Trainer(cfg)
    assert trainer.step == 3
    torch.testing.assert_close(trainer.model.state_dict(), model.state_dict(), rtol=0, atol=0)
    history = trainer.run()
    assert [m["step"] for m in history] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in history]),
                               torch.tensor([m["loss"] for m in first_try[3:]]), rtol=1e-6, atol=0)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert checkpointing.checkpoints(out) == [step_dir(out, 3), step_dir(out, 6)]
    flare.load_model(step_dir(out, 6))


def test_resume_tolerates_a_torn_metrics_line(make_config, tmp_path):
    """A crash can cut the last metrics line short; resuming must not choke on it."""
    cfg = from_dict(TrainConfig, make_config(steps=2, save_every=2))
    Trainer(cfg).run()
    log = tmp_path / "out" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')
    cfg = from_dict(TrainConfig, make_config(steps=3, save_every=2))
    trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.run()
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2, 3]


def test_finished_run_restarted_does_nothing(straight_run):
    """Re-running a finished run's command resumes at the end: no new steps, the log unchanged."""
    before = (straight_run.out / "metrics.jsonl").read_text()
    trainer = Trainer(from_dict(TrainConfig, straight_run.cfg))
    assert trainer.step == N
    assert trainer.run() == []
    assert (straight_run.out / "metrics.jsonl").read_text() == before
