"""`flare` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flare.cliargs import add_dataclass_flags, dataclass_from_args
from flare.decoding.params import SamplingParams

# Mode options given on the command line; unset ones keep the mode's own default (flare.decoding.options).
MODE_OPTIONS = ("gen_block", "draft_policy", "block_size", "threshold", "steps")

SAMPLING_HELP = {
    "temperature": "sampling temperature; 0 is greedy",
    "top_k": "keep the k most likely tokens; 0 disables",
    "top_p": "keep the smallest set of tokens with this much probability mass",
    "max_new_tokens": "tokens to generate per prompt",
    "seed": "random seed for sampling",
    "stop_token_ids": "extra token ids that end generation",
    "ignore_eos": "keep generating past the end-of-sequence token",
}


def _generate(args: argparse.Namespace) -> int:
    import torch

    import flare
    from flare.decoding import decode, mode_options
    from flare.tokenizer import TextTokenizer

    options = {k: getattr(args, k) for k in MODE_OPTIONS if getattr(args, k) is not None}
    mode_options(args.mode, **options)  # bad modes and options fail before the model loads
    params = dataclass_from_args(SamplingParams, args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = flare.load_model(args.model, device=args.device, dtype=dtype)
    tokenizer = TextTokenizer.from_dir(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json; pass --prompt-ids instead")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = args.prompt_ids
    result = decode(model, [prompt], params, args.mode, **options)
    ids = result.token_ids[0]
    text = tokenizer.decode(ids) if tokenizer is not None else None
    if args.json:
        out = {
            "mode": result.mode,
            "prompt_ids": prompt,
            "token_ids": ids,
            "finish_reason": result.finish_reasons[0],
            "forwards": result.forwards,
            "tokens_per_forward": result.tokens_per_forward,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "kernel_paths": result.kernel_paths,
        }
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, ids)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from flare.train.convert import convert

    mask_id = convert(args.src, args.dst, args.mask_token_id)
    print(f"wrote FLARE checkpoint {args.dst} (mask token id {mask_id})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from flare.train.config import load_config
    from flare.train.loop import Trainer

    config = load_config(args.config, args.set or [])
    history = Trainer(config).run()
    # Under torchrun every rank returns the same history; one line is enough.
    if history and os.environ.get("RANK", "0") == "0":
        print(json.dumps(history[-1]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    print(
        "flare demo will: train a tiny hybrid AR model on generated arithmetic chats, convert it with the FLARE "
        "objective, and evaluate it in every decoding mode (accuracy, tokens per forward, speed). Its evaluation "
        "report is not built yet. What works today: `flare convert`, `flare train` (objectives flare, "
        "block_diffusion, ar; torchrun for data parallelism) and `flare generate --mode "
        "causal|ar_trust|diffusion_trust|low_confidence|llada` (see each command's --help)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flare import __version__

    parser = argparse.ArgumentParser(prog="flare", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flare-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from a checkpoint", description="Generate from a checkpoint.")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as comma-separated token ids")
    gen.add_argument("--mode", default="causal",
                     help="decoding mode: causal, ar_trust, diffusion_trust, low_confidence, llada (default: causal)")
    gen.add_argument("--gen-block", type=int, help="ar_trust: tokens per round N (default 4)")
    gen.add_argument("--draft-policy", help="ar_trust: exact_truncated (default), argmax_full_verify, argmax_truncated")
    gen.add_argument("--block-size", type=int, help="block modes: block length (diffusion_trust 3, low_confidence 4, "
                     "llada 32)")
    gen.add_argument("--threshold", type=float, help="block modes: confidence threshold in (0, 1]")
    gen.add_argument("--steps", type=int, help="llada: denoising steps per block (default 16)")
    add_dataclass_flags(gen, SamplingParams, SAMPLING_HELP)
    gen.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="cast weights to this dtype (default: as stored)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with tokens and counters")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="turn an AR checkpoint into a FLARE checkpoint (adds the [MASK] row)",
                          description="Turn an AR checkpoint into a FLARE checkpoint; AR behaviour is unchanged.")
    conv.add_argument("--from", dest="src", required=True, help="AR checkpoint directory")
    conv.add_argument("--to", dest="dst", required=True, help="output directory (new or empty)")
    conv.add_argument("--mask-token-id", type=int, default=None,
                      help="use this vocabulary row as [MASK] (default: a row the tokenizer never emits)")
    conv.set_defaults(func=_convert)

    train = sub.add_parser("train", help="train (AR, FLARE or block-diffusion objective); torchrun for several ranks",
                           description="Train from a YAML/JSON config; keys not in the config schema are errors. "
                                       "Launch with torchrun --nproc-per-node N for data parallelism (FSDP2).")
    train.add_argument("--config", help="YAML or JSON config file (flare.train.config.TrainConfig)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-4 --set objective.kind=ar")
    train.set_defaults(func=_train)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                         description="Serve a checkpoint over an OpenAI-compatible API. Per-request decoding mode "
                                     "via the body field \"flare\": {\"mode\": ..., <mode options>}.")
    srv.add_argument("model", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--mode", default="causal", help="default decoding mode for requests that name none")
    srv.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoding at once (default: 16)")
    srv.add_argument("--max-waiting", type=int, default=256,
                     help="requests queued beyond those; more are answered 429 (default: 256)")
    srv.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted (default: 4096)")
    srv.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens accepted (default: 4096)")
    srv.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    srv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="cast weights to this dtype (default: as stored)")
    srv.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="the end-to-end CPU demo (what `make demo` runs)")
    demo.set_defaults(func=_demo)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import torch

    from flare.engine import EngineConfig
    from flare.serve import serve

    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                          max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_tokens,
                          default_mode=args.mode)
    serve(args.model, host=args.host, port=args.port, config=config, device=args.device,
          dtype=getattr(torch, args.dtype) if args.dtype else None)
    return 0


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    return ids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"flare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
