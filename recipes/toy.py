"""The toy FLARE pipeline end to end on CPU: data -> tiny hybrid AR source -> convert -> FLARE -> decode.

1. arithmetic chat data (recipes.arithmetic), a character tokenizer with ChatML specials;
2. a fresh ~0.7M-parameter Qwen3.5-style hybrid trained from scratch with the AR objective (the "seed");
3. ``flare convert`` (the [MASK] row), then FLARE training (token-equal AR + diffusion loss);
4. greedy accuracy on held-out problems and tokens per forward in each decoding mode.

    python -m recipes.toy --out runs/toy [--quick] [--ar-steps N] [--flare-steps N]

Each stage's output is a checkpoint directory under ``--out`` and is reused when present, so a second run only
redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flare.checkpoint import load_model, save_model
from flare.config import ModelConfig
from flare.data import ChatTokenizer, save_char_tokenizer
from flare.data.jsonl import write_jsonl
from flare.decoding import SamplingParams, decode
from flare.model import FlareModel
from flare.objective import ObjectiveConfig
from flare.train.checkpointing import checkpoints
from flare.train.config import DataConfig, OptimConfig, SourceConfig, TrainConfig
from flare.train.convert import convert
from flare.train.loop import Trainer
from recipes.arithmetic import generate_rows, score


@dataclass
class ToyBudget:
    # Sized for a few minutes on 2 CPU cores: a step is ~0.3-0.6 s at batch 8 x 96 tokens.
    train_rows: int = 4000
    heldout_rows: int = 100
    ar_steps: int = 400
    flare_steps: int = 300
    batch_size: int = 8
    seq_len: int = 96
    ar_lr: float = 3e-3
    flare_lr: float = 1e-3
    max_digits: int = 2


QUICK = ToyBudget(train_rows=800, heldout_rows=20, ar_steps=40, flare_steps=30, batch_size=8, seq_len=96)


def make_data(out: Path, budget: ToyBudget, seed: int = 0) -> tuple[Path, Path]:
    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    if not train.exists():
        write_jsonl(generate_rows(budget.train_rows, seed, max_digits=budget.max_digits), train)
        # A different seed: held-out problems are (mostly) not in the training set.
        write_jsonl(generate_rows(budget.heldout_rows, seed + 1000, max_digits=budget.max_digits), heldout)
    return train, heldout


def init_source(out: Path, seed: int = 0) -> Path:
    """A fresh tiny hybrid with a character tokenizer; eos is the end of an assistant turn."""
    path = out / "init"
    if (path / "config.json").exists():
        return path
    tok = save_char_tokenizer(path)
    config = ModelConfig.new_hybrid(
        vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=4, intermediate_size=256,
        eos_token_id=tok.token_id("<|im_end|>"), pad_token_id=tok.pad_id,
    )
    save_model(FlareModel(config).init_weights(seed), path, tokenizer_from=path)
    return path


def train(model: Path, out: Path, kind: str, steps: int, lr: float, data: Path, budget: ToyBudget,
          progress: bool = True) -> Path:
    """Train (or resume) ``kind`` and return the final checkpoint directory."""
    done = checkpoints(out)
    if done and int(done[-1].name.split("-")[1]) >= steps:
        return done[-1]
    cfg = TrainConfig(
        model=str(model), out_dir=str(out), objective=ObjectiveConfig(kind=kind),
        data=DataConfig(train=[SourceConfig(str(data))], seq_len=budget.seq_len),
        optim=OptimConfig(lr=lr, warmup_steps=min(50, steps // 10), schedule="cosine", grad_clip=1.0),
        steps=steps, batch_size=budget.batch_size, save_every=steps, keep_last=1, progress=progress,
    )
    Trainer(cfg).run()
    return checkpoints(out)[-1]


def prompt_ids(tok: ChatTokenizer, question: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def evaluate(model_dir: Path, heldout: Path, modes: dict[str, dict], limit: int | None = None,
             max_new_tokens: int = 64) -> dict[str, dict]:
    """Greedy accuracy, tokens per forward and tokens/s per mode, on the held-out problems (one batch)."""
    model = load_model(model_dir)
    tok = ChatTokenizer.from_dir(model_dir)
    rows = [json.loads(line) for line in heldout.read_text().splitlines()][:limit]
    prompts = [prompt_ids(tok, r["messages"][0]["content"]) for r in rows]
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    report, causal_tokens = {}, None
    for mode, options in modes.items():
        if mode != "causal" and model.config.mask_token_id is None:
            continue
        start = time.perf_counter()
        out = decode(model, prompts, params, mode, **options)
        seconds = time.perf_counter() - start
        texts = [tok.decode(t) for t in out.token_ids]
        if mode == "causal":
            causal_tokens = out.token_ids
        report[mode] = {
            "accuracy": sum(score(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows),
            "tokens_per_forward": out.tokens_per_forward,
            "tokens_per_s": out.new_tokens / seconds,
            "same_as_causal": None if causal_tokens is None else sum(
                a == b for a, b in zip(out.token_ids, causal_tokens)) / len(rows),
            "accepted_per_drafted": out.accepted / out.drafted if out.drafted else None,
            "example": texts[0],
        }
    return report


MODES = {"causal": {}, "ar_trust": {"gen_block": 4}, "diffusion_trust": {}, "low_confidence": {}}


def run(out: Path, budget: ToyBudget, seed: int = 0, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data, heldout = make_data(out, budget, seed)
    source = train(init_source(out, seed), out / "ar", "ar", budget.ar_steps, budget.ar_lr, data, budget, progress)
    converted = out / "converted"
    if not (converted / "config.json").exists():
        convert(source, converted)
    final = train(converted, out / "flare", "flare", budget.flare_steps, budget.flare_lr, data, budget, progress)
    return {"source": evaluate(source, heldout, {"causal": {}}), "flare": evaluate(final, heldout, MODES)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy", help="working directory (stages are reused when present)")
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke version")
    ap.add_argument("--ar-steps", type=int, help="override the AR training steps")
    ap.add_argument("--flare-steps", type=int, help="override the FLARE training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else ToyBudget()
    if args.ar_steps:
        budget.ar_steps = args.ar_steps
    if args.flare_steps:
        budget.flare_steps = args.flare_steps
    print(json.dumps(run(Path(args.out), budget, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
