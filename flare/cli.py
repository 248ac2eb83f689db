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
    from pathlib import Path

    from flare.demo import QUICK, Budget, run

    run(Path(args.out), QUICK if args.quick else Budget(), seed=args.seed)
    return 0


def _eval_llm(args: argparse.Namespace):
    import torch

    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    return LLM.from_dir(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                        config=EngineConfig(max_num_seqs=args.max_num_seqs))


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flare.eval import evaluate, load_task, parse_modes
    from flare.eval.plots import accuracy_plot
    from flare.eval.report import accuracy_table

    modes = parse_modes(args.modes)
    task = load_task(args.task, limit=args.limit, seed=args.seed)
    for line, why in task.skipped:
        print(f"flare eval: skipped {args.task} line {line}: {why}", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens, seed=args.seed)
    report = evaluate(_eval_llm(args), task, modes, params, progress=not args.json)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
        accuracy_plot(report, Path(args.out) / "accuracy_vs_tpf.png")
    print(json.dumps(report.to_dict()) if args.json else accuracy_table(report))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flare.eval import EngineTarget, HttpTarget, parse_modes, run_waves
    from flare.eval.plots import throughput_plot
    from flare.eval.report import scaling_lines, throughput_table
    from flare.eval.tasks import load_task

    if (args.model is None) == (args.base_url is None):
        raise ValueError("give exactly one of --model (in-process engine) and --base-url (a running server)")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = parse_modes(args.modes, server=True)
    if args.model is not None:
        args.max_num_seqs = max(args.max_num_seqs, *concurrency)
        target = EngineTarget(_eval_llm(args))
    else:
        target = HttpTarget(args.base_url, args.served_model)
    questions = [item.question for item in load_task(args.task, limit=max(concurrency) * 4).items]
    runs = [run_waves(target, questions, mode, c, args.max_tokens, args.waves, options=options)
            for mode, options in modes for c in concurrency]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps([r.to_dict() for r in runs], indent=2))
        throughput_plot(runs, Path(args.out) / "throughput.png")
    if args.json:
        print(json.dumps([r.to_dict() for r in runs]))
    else:
        print(throughput_table(runs) + "\n\n" + "\n".join(scaling_lines(runs)))
    return 0 if all(r.valid for r in runs) else 1


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

    ev = sub.add_parser("eval", help="accuracy, tokens per forward and speed per decoding mode",
                        description="Evaluate a checkpoint on a task in several decoding modes through the engine. "
                                    "TASK: arithmetic[:DIGITS], reasoning_gym:NAME, or a JSONL file (GSM8K "
                                    "format {question, answer: '... #### N'}, or chat rows with an 'answer').")
    ev.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json")
    ev.add_argument("--task", required=True, help="arithmetic[:DIGITS] | reasoning_gym:NAME | path/to/file.jsonl")
    ev.add_argument("--modes", default="causal,ar_trust,diffusion_trust",
                    help="comma-separated decoding modes, each with optional :key=value options, e.g. "
                         "low_confidence:block_size=3 (default: causal,ar_trust,diffusion_trust)")
    ev.add_argument("--limit", type=int, help="evaluate the first N questions (generators: how many to make)")
    ev.add_argument("--max-tokens", type=int, default=256, help="new tokens per answer (default: 256)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    ev.add_argument("--seed", type=int, default=0, help="generator and sampling seed (default: 0)")
    ev.add_argument("--max-num-seqs", type=int, default=16, help="questions decoded at once (default: 16)")
    ev.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--out", help="also write eval.json and accuracy_vs_tpf.png here")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ev.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="fixed-output throughput waves (in-process or any OpenAI-compatible "
                                         "server)",
                           description="The fixed-output wave protocol: per mode and concurrency C, a warm-up "
                                       "wave of C requests, then measured waves; every completion must have "
                                       "exactly --max-tokens tokens (ignore_eos).")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint directory: run the engine in this process")
    target.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    bench.add_argument("--served-model", help="model name to send to --base-url (default: its first model)")
    bench.add_argument("--modes", default="causal,ar_trust,diffusion_trust,low_confidence",
                       help="comma-separated modes with optional :key=value options (as in flare eval); 'server' "
                            "sends no mode (another server, or the default)")
    bench.add_argument("--concurrency", default="1,4,8", help="comma-separated C values (default: 1,4,8)")
    bench.add_argument("--max-tokens", type=int, default=128, help="exact completion length (default: 128)")
    bench.add_argument("--waves", type=int, default=3, help="measured waves after the warm-up (default: 3)")
    bench.add_argument("--task", default="arithmetic", help="where the prompts come from (default: arithmetic)")
    bench.add_argument("--max-num-seqs", type=int, default=16, help="engine slots with --model (default: 16)")
    bench.add_argument("--device", default="cpu", help="torch device with --model (default: cpu)")
    bench.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--out", help="also write bench.json and throughput.png here")
    bench.add_argument("--json", action="store_true", help="print the runs as JSON")
    bench.set_defaults(func=_bench)

    from flare.transfer.cli import add_commands

    add_commands(sub)

    demo = sub.add_parser("demo", help="the end-to-end CPU demo (what `make demo` runs)",
                          description="Train a tiny hybrid AR model on generated arithmetic, convert it with FLARE, "
                                      "evaluate causal / AR-Trust / Diffusion-Trust / low-confidence decoding, "
                                      "and write OUT/report.md with tables and plots. Trained checkpoints are "
                                      "cached under OUT/cache and reused.")
    demo.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    demo.add_argument("--quick", action="store_true", help="a ~1-minute smoke version (what CI runs)")
    demo.add_argument("--seed", type=int, default=0)
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
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        print(f"flare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
