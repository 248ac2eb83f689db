"""Stage ``train``: the seed with a [MASK] row (``flare convert``), trained with the FLARE objective on the
transfer data (``flare.train.Trainer``; resumes from its last checkpoint after a kill).

Block size ``BLOCK_SIZE``: the transfer answers are short (about 10 to 30 tokens), and a block of 4 leaves
AR-Trust up to 5 tokens per forward while asking the MASK rows to guess no more than 3 tokens ahead of what they
see. ``CHECKPOINTS`` checkpoints are kept along the run, for the evaluation's retention and tokens-per-forward
trend. bf16 autocast with fp32 master weights where the device multiplies bf16 natively
(``flare.device.native_bf16``), fp32 elsewhere.
"""

from __future__ import annotations

import os
import shutil

from recipes.smollm2.common import Run, read_json, write_json

BLOCK_SIZE = 4
SEQ_LEN = 256  # a multiple of BLOCK_SIZE; a transfer row with its chat template is ~60-120 tokens
BATCH_SIZE = 4
# 320: twice as many (640, about 25 epochs of the 304 rows, measured on an AMX Xeon) raised AR-Trust's tokens per
# forward only a little (per task 2.42 / 1.90 / 3.29 against 2.24 / 1.74 / 3.17 on the transfer tasks; bf16 batch 1
# 1.97x causal against 1.87x) and cost the held-out one-digit arithmetic 19 points (33.3% against the seed's 52.1%;
# 54.2% after 320 steps).
STEPS, QUICK_STEPS = 320, 2
# --quick only shows that training runs and checkpoints: one row of 128 tokens a step (1/8 of a full step's work;
# a full step takes about 12 s in fp32 on 2 AVX2 cores and 2.9 s in bf16 on 2 AMX cores, where it took 4.6 s before
# the idle noisy blocks were dropped).
QUICK_SEQ_LEN, QUICK_BATCH_SIZE = 128, 1
# 1e-4: tokens per forward grow with the MASK rows' training signal. The first full run (1e-4, 162 rows) and the
# second (3e-5, 304 rows) drifted from the seed alike (greedy agreement 0-33% / 0-38%: the scorer's filter, not the
# step size), but at 3e-5 the drafts learned less (AR-Trust 1.66 against 1.97 tokens per forward).
LR, WARMUP = 1e-4, 20
CHECKPOINTS = 4


def steps(run: Run) -> int:
    return QUICK_STEPS if run.quick else STEPS


def checkpoints(run: Run) -> list:
    from flare.train.checkpointing import checkpoints as found

    return found(run.train) if run.train.is_dir() else []


STAMP = "recipe.json"  # in the training folder: the settings and the transfer data it was trained with


PATHS = "relative to the run's folder"  # how a stamp names its paths (stamps without this key: as given)


def stamp(run: Run) -> dict:
    """The settings and transfer data, with the run's paths relative to its folder: the same run named by a
    relative or an absolute ``--out`` (the speed stage's own process gets an absolute one) has the same stamp."""
    from flare.train.config import to_dict

    return _relative(run, {"config": to_dict(config(run)), "transfer": read_json(run.transfer.with_suffix(".json"))})


def _relative(run: Run, found):
    """A stamp whose paths are as given (relative to the working directory, or absolute: what stamps held before
    ``PATHS``) with them made relative to the run's folder, without following symlinks; anything else as it is."""
    if not isinstance(found, dict) or "paths" in found:
        return found

    def within(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(run.work))

    try:
        cfg = found["config"]
        cfg["model"], cfg["out_dir"] = within(cfg["model"]), within(cfg["out_dir"])
        for source in cfg["data"]["train"]:
            source["path"] = within(source["path"])
    except (KeyError, TypeError):
        return found
    return {**found, "paths": PATHS}


def trained_as_now(run: Run) -> bool:
    """Whether the training folder's stamp is this run's settings and transfer data."""
    return _relative(run, read_json(run.train / STAMP)) == stamp(run)


def done(run: Run) -> bool:
    have = checkpoints(run)
    return (bool(have) and int(have[-1].name.split("-")[1]) >= steps(run)
            and trained_as_now(run))


def config(run: Run):
    from flare.device import native_bf16, pick_device
    from flare.objective import ObjectiveConfig
    from flare.train.config import DataConfig, OptimConfig, SourceConfig, TrainConfig

    n = steps(run)
    return TrainConfig(
        model=str(run.converted), out_dir=str(run.train),
        objective=ObjectiveConfig(kind="flare", block_size=BLOCK_SIZE),
        data=DataConfig(train=[SourceConfig(str(run.transfer))], seq_len=QUICK_SEQ_LEN if run.quick else SEQ_LEN),
        optim=OptimConfig(lr=LR, warmup_steps=min(WARMUP, n // 10), schedule="cosine"),
        steps=n, batch_size=QUICK_BATCH_SIZE if run.quick else BATCH_SIZE, bf16=native_bf16(pick_device()),
        save_every=max(1, n // CHECKPOINTS), keep_last=CHECKPOINTS, seed=0)


def make(run: Run) -> None:
    from flare.train.convert import convert
    from flare.train.loop import Trainer

    if read_json(run.transfer.with_suffix(".json")) is None:
        raise SystemExit(f"no transfer data at {run.transfer}: run the distill stage first")
    if not (run.converted / "config.json").is_file():
        tmp = run.converted.with_name(f".{run.converted.name}.tmp-0")
        shutil.rmtree(tmp, ignore_errors=True)
        mask = convert(run.seed, tmp)
        tmp.replace(run.converted)
        print(f"  converted {run.seed} -> {run.converted} ([MASK] = token {mask})", flush=True)
    if checkpoints(run) and not trained_as_now(run):
        raise SystemExit(f"{run.train} holds checkpoints trained on other transfer data or settings: remove it "
                         "(or pick another --out) to train again")
    run.train.mkdir(parents=True, exist_ok=True)
    write_json(run.train / STAMP, stamp(run))
    Trainer(config(run)).run()
