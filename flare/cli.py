"""`flare` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flare.cliargs import add_dataclass_flags, dataclass_from_args, token_ids
from flare.decoding.params import SamplingParams
from flare.device import prepare_process

SAMPLING_HELP = {
    "temperature": "sampling temperature; 0 is greedy",
    "top_k": "keep the k most likely tokens; 0 disables",
    "top_p": "keep the smallest set of tokens with this much probability mass",
    "max_new_tokens": "tokens to generate per prompt",
    "seed": "random seed for sampling",
    "stop_token_ids": "extra token ids that end generation",
    "ignore_eos": "keep generating past the end-of-sequence token",
}
DEVICE_HELP = "torch device (default: cuda when available, else cpu)"
DTYPES = ["auto", "stored", "float32", "bfloat16", "float16"]
DTYPE_HELP = ("weights and compute dtype; auto: bfloat16 where the hardware computes it natively (CUDA, CPUs with "
              "AMX or AVX-512-BF16), else as stored (default: auto, or $FLARE_DTYPE)")


def _option_fields() -> dict[str, list[type]]:
    """Every option name of any mode, with the options classes that take it."""
    import dataclasses

    from flare.decoding import OPTIONS

    fields: dict[str, list[type]] = {}
    for cls in OPTIONS.values():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, []).append(cls)
    return fields


def _add_mode_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per mode option, generated from the options dataclasses (help and defaults included); values are
    typed by ``flare.decoding.make_options`` from the field's type."""
    from flare.decoding import OPTIONS
    from flare.decoding.options import option_type

    parser.add_argument("--mode", default="causal", help=f"decoding mode: {', '.join(OPTIONS)} (default: causal)")
    for name, classes in _option_fields().items():
        first = classes[0].__dataclass_fields__[name]
        defaults = [f"{c.mode} {d}" for c in classes if (d := c.__dataclass_fields__[name].default) is not None]
        text = first.metadata["help"] + (f" (default: {', '.join(defaults)})" if defaults else "")
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=text,
                            metavar=option_type(classes[0], name).__name__.upper())


def _mode_from_args(args: argparse.Namespace):
    """The options of ``--mode`` from the option flags given; a flag the mode does not take is an error."""
    from flare.decoding import make_options

    given = {name: v for name in _option_fields() if (v := getattr(args, name)) is not None}
    return make_options(args.mode, given)


def _generate(args: argparse.Namespace) -> int:
    from flare.device import describe
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    options = _mode_from_args(args)  # bad modes and options fail before the model loads
    params = dataclass_from_args(SamplingParams, args)
    llm = LLM.from_dir(args.model, device=args.device, dtype=args.dtype,
                       config=EngineConfig(max_num_seqs=1, max_prompt_tokens=1 << 30,
                                           max_new_tokens=params.max_new_tokens))
    if args.prompt is not None and llm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; pass --prompt-ids instead")
    prompt = llm.prompt_ids(args.prompt if args.prompt is not None else args.prompt_ids)
    done = llm.generate([prompt], params, options)[0]
    text = done.text if llm.tokenizer is not None else None
    if args.json:
        out = {
            "mode": done.options.mode, "options": done.options.given(),
            "prompt_ids": prompt, "token_ids": done.token_ids, "finish_reason": done.finish_reason,
            "forwards": done.forwards, "tokens_per_forward": done.tokens_per_forward,
            "drafted": done.drafted, "accepted": done.accepted,
            "kernel_paths": llm.model.kernel_paths(),
            "device": str(llm.model.device),
            "dtype": str(llm.model.dtype).removeprefix("torch."),
            "path": describe(llm.model.device, llm.model.dtype, llm.model),
        }
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, done.token_ids)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from flare.checkpoint.gguf import convert_command
    from flare.train.convert import convert

    if not convert_command(args.src, args.dst, args.dtype, args.mask_token_id):  # not a GGUF file: a directory
        print(f"wrote FLARE checkpoint {args.dst} (mask token id {convert(args.src, args.dst, args.mask_token_id)})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from flare.train.config import load_config
    from flare.train.loop import Trainer

    config = load_config(args.config, args.set or [])
    if args.dry_run:
        from flare.train.memory import report

        print(report(config, world=int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
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
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    return LLM.from_dir(args.model, device=args.device, dtype=args.dtype,
                        config=EngineConfig(max_num_seqs=args.max_num_seqs))


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flare.decoding import parse_modes
    from flare.eval import evaluate, load_task
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

    from flare.eval import EngineTarget, HttpTarget, parse_targets, run_waves
    from flare.eval.plots import throughput_plot
    from flare.eval.report import scaling_lines, throughput_table
    from flare.eval.tasks import load_task

    if (args.model is None) == (args.base_url is None):
        raise ValueError("give exactly one of --model (in-process engine) and --base-url (a running server)")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = parse_targets(args.modes)
    if args.model is not None:
        args.max_num_seqs = max(args.max_num_seqs, *concurrency)
        target = EngineTarget(_eval_llm(args), args.temperature, args.top_p)
    else:
        target = HttpTarget(args.base_url, args.served_model, temperature=args.temperature, top_p=args.top_p)
    questions = [item.question for item in load_task(args.task, limit=max(concurrency) * 4).items]
    runs = [run_waves(target, questions, mode, c, args.max_tokens, args.waves, until_eos=args.until_eos)
            for mode in modes for c in concurrency]
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
    from flare.engine import EngineConfig

    parser = argparse.ArgumentParser(prog="flare", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flare-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from a checkpoint", description="Generate from a checkpoint.")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-ids", type=token_ids, help="prompt as comma-separated token ids")
    _add_mode_flags(gen)
    add_dataclass_flags(gen, SamplingParams, SAMPLING_HELP)
    gen.add_argument("--device", default=None, help=DEVICE_HELP)
    gen.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
    gen.add_argument("--json", action="store_true", help="print one JSON object with tokens and counters")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="turn an AR checkpoint into a FLARE one, or import a GGUF file as AR",
                          description="Turn an AR checkpoint into a FLARE one (adds the [MASK] row; AR behaviour is "
                          "unchanged), or import a llama.cpp GGUF file as an AR checkpoint: convert that next.")
    conv.add_argument("--from", dest="src", required=True, help="AR checkpoint directory, or a .gguf file to import")
    conv.add_argument("--to", dest="dst", required=True, help="output directory (new or empty)")
    conv.add_argument("--mask-token-id", type=int, help="the [MASK] row (default: a row the tokenizer never emits)")
    conv.add_argument("--dtype", choices=DTYPES[2:], help="weights of a GGUF import (default: float32)")
    conv.set_defaults(func=_convert)

    train = sub.add_parser("train", help="train (AR, FLARE or block-diffusion objective); torchrun for several ranks",
                           description="Train from a YAML/JSON config; keys not in the config schema are errors. "
                                       "Launch with torchrun --nproc-per-node N for data parallelism (FSDP2).")
    train.add_argument("--config", help="YAML or JSON config file (flare.train.config.TrainConfig)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-4 --set objective.kind=ar")
    train.add_argument("--dry-run", action="store_true",
                       help="print the memory one training step will need (parameters, gradients, optimizer state, "
                            "activations with and without checkpointing, one logits chunk) and the token budget, "
                            "replayed on fake tensors: nothing is allocated and no data is read")
    train.set_defaults(func=_train)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                         description="Serve a checkpoint over an OpenAI-compatible API. Per-request decoding mode "
                                     "via the body field \"flare\": {\"mode\": ..., <mode options>}.")
    srv.add_argument("model", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--mode", default=EngineConfig.default_mode,
                     help="decoding mode for requests that name none, with optional :key=value options, e.g. "
                          "ar_trust:gen_block=3 (default: %(default)s)")
    srv.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                     help="sequences decoding at once (default: %(default)s)")
    srv.add_argument("--max-waiting", type=int, default=EngineConfig.max_waiting,
                     help="requests queued beyond those; more are answered 429 (default: %(default)s)")
    srv.add_argument("--max-prompt-tokens", type=int, default=EngineConfig.max_prompt_tokens,
                     help="longest prompt accepted (default: %(default)s)")
    srv.add_argument("--max-tokens", type=int, default=EngineConfig.max_new_tokens,
                     help="largest max_tokens accepted (default: %(default)s)")
    srv.add_argument("--prefix-cache-mb", type=int, default=EngineConfig.prefix_cache_mb,
                     help="MiB of prompt beginnings' states kept for later prompts; 0: off (default: %(default)s)")
    srv.add_argument("--device", default=None, help=DEVICE_HELP)
    srv.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
    srv.add_argument("--engine", default="process", choices=("process", "thread"),
                     help="engine in a process of its own, or in a thread of the server's (default: %(default)s)")
    srv.set_defaults(func=_serve)

    ev = sub.add_parser("eval", help="accuracy, tokens per forward and speed per decoding mode",
                        description="Evaluate a checkpoint on a task in several decoding modes through the engine. "
                                    "TASK: arithmetic[:DIGITS], reasoning_gym:NAME[?k=v&...], or a JSONL file (GSM8K "
                                    "format {question, answer: '... #### N'}, or chat rows with an 'answer').")
    ev.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json")
    ev.add_argument("--task", required=True, help="arithmetic[:DIGITS] | reasoning_gym:NAME[?k=v&...] | FILE.jsonl")
    ev.add_argument("--modes", default="causal,ar_trust,diffusion_trust",
                    help="comma-separated decoding modes, each with optional :key=value options, e.g. "
                         "low_confidence:block_size=3 (default: causal,ar_trust,diffusion_trust)")
    ev.add_argument("--limit", type=int, help="evaluate the first N questions (generators: how many to make)")
    ev.add_argument("--max-tokens", type=int, default=256, help="new tokens per answer (default: 256)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    ev.add_argument("--seed", type=int, default=0, help="generator and sampling seed (default: 0)")
    ev.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                    help="questions decoded at once (default: %(default)s)")
    ev.add_argument("--device", default=None, help=DEVICE_HELP)
    ev.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
    ev.add_argument("--out", help="also write eval.json and accuracy_vs_tpf.png here")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ev.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="fixed-output throughput waves (in-process or any OpenAI server)",
                           description="The fixed-output wave protocol: per mode and concurrency C, a warm-up "
                                       "wave of C requests, then measured waves; every completion must have "
                                       "exactly --max-tokens tokens (ignore_eos), or with --until-eos ends at EOS.")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint directory: run the engine in this process")
    target.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    bench.add_argument("--served-model", help="model name to send to --base-url (default: its first model)")
    bench.add_argument("--modes", default="causal,ar_trust,diffusion_trust,low_confidence",
                       help="comma-separated modes with optional :key=value options (as in flare eval); 'server' "
                            "sends no mode (another server, or the default)")
    bench.add_argument("--concurrency", default="1,4,8", help="comma-separated C values (default: 1,4,8)")
    bench.add_argument("--max-tokens", type=int, default=128, help="exact completion length (default: 128)")
    bench.add_argument("--until-eos", action="store_true", help="answers end at EOS (--max-tokens caps them): "
                       "tokens/s of answers as users get them, the text after them untimed")
    bench.add_argument("--waves", type=int, default=3, help="measured waves after the warm-up (default: 3)")
    bench.add_argument("--temperature", type=float, default=0.0, help="of every request (default 0: greedy; else "
                       "unseeded sampling, as a client's default request)")
    bench.add_argument("--top-p", type=float, default=1.0, help="of every sampled request (default: 1)")
    bench.add_argument("--task", default="arithmetic", help="where the prompts come from (default: arithmetic)")
    bench.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                       help="engine slots with --model (default: %(default)s)")
    bench.add_argument("--device", default=None, help=DEVICE_HELP + ", with --model")
    bench.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
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
    from flare.engine import EngineConfig
    from flare.serve import serve

    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                          max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_tokens,
                          default_mode=args.mode, prefix_cache_mb=args.prefix_cache_mb)
    serve(args.model, host=args.host, port=args.port, config=config, device=args.device, dtype=args.dtype,
          engine=args.engine)
    return 0


def main(argv: list[str] | None = None) -> int:
    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        print(f"flare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
