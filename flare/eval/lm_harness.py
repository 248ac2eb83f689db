"""lm-evaluation-harness adapter: the ``flare`` model class, so lm-eval tasks run in any decoding mode.

    python -m flare.eval.lm_harness --model flare \\
        --model_args pretrained=DIR,mode=ar_trust,gen_block=4 --tasks gsm8k --include_path my_tasks/

(the same arguments as ``lm_eval``; this module registers ``flare`` and hands over to lm-eval's command line).
``generate_until`` runs through the batched engine in the chosen mode (other ``model_args`` are that mode's
options, typed by ``flare.decoding.make_options``); ``loglikelihood`` scores continuations under the causal rows, i.e. the AR distribution, whatever the
mode. The device is lm-eval's ``--device`` when this machine has it, else the CPU, with a warning (lm-eval
asks for CUDA unless told otherwise). Needs the ``eval`` extra: ``pip install 'flare-lm[eval]'``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from flare.decoding import SamplingParams, make_options
from flare.engine import EngineConfig
from flare.engine.llm import LLM


@register_model("flare")
class FlareLM(LM):
    def __init__(self, pretrained: str, mode: str = "causal", max_gen_toks: int = 256, max_num_seqs: int = 16,
                 device: str | None = None, dtype: str | None = None, batch_size: Any = None, **options: Any
                 ) -> None:
        super().__init__()
        self.options = make_options(mode, options)  # bad modes and options fail before the model loads
        self.llm = LLM.from_dir(pretrained, device=device, dtype=dtype,
                                config=EngineConfig(max_num_seqs=int(max_num_seqs)))
        if self.llm.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer.json")
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.llm.model.device

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 0.0)) > 0
            params = SamplingParams(
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            )
            prompts = [requests[i].args[0] for i in idx]
            done = self.llm.generate(prompts, params, self.options, stop=until,
                                     progress=None if disable_tqdm else f"lm-eval {self.options.label()}")
            for i, c in zip(idx, done):
                out[i] = c.text
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        model = self.llm.model
        ids = torch.tensor([context + continuation], device=model.device)
        logprobs = torch.log_softmax(model(ids)[0, len(context) - 1: -1].float(), dim=-1)
        target = torch.tensor(continuation, device=model.device)
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    def _prefix(self) -> list[int]:
        eos = self.llm.model.config.eos_token_ids
        return [eos[0] if eos else 0]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        tok, results = self.llm.tokenizer, []
        for req in requests:
            context, continuation = req.args
            ctx = tok.encode(context) if context else self._prefix()
            cont = tok.encode(continuation)
            if not cont:
                results.append((0.0, True))
                continue
            results.append(self._score(ctx, cont))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tok = self.llm.tokenizer
        return [self._score(self._prefix(), tok.encode(req.args[0]))[0] if req.args[0] else 0.0
                for req in requests]

    # ------------------------------------------------------------------------------------------ chat
    @property
    def tokenizer_name(self) -> str:
        return f"flare-{self.llm.name}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.chat_text(chat_history)


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
