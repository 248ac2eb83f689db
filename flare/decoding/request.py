"""The one check of a decoding request, called once wherever a request enters (``decode``, ``Engine``).

Everything below it (stepper, lanes) trusts what it returns: known options resolved against the checkpoint,
a mask token where the mode needs one, prompt ids inside the vocabulary.
"""

from __future__ import annotations

import warnings

from flare.config import ModelConfig
from flare.decoding.options import ModeOptions


def check_prompt(prompt: list[int], vocab_size: int, index: int = 0) -> None:
    if len(prompt) == 0:
        raise ValueError(f"prompt {index} is empty: at least one token is needed")
    for t in prompt:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt {index}: token id {t!r} is outside the vocabulary [0, {vocab_size})")


def check_request(config: ModelConfig, prompts: list[list[int]], options: ModeOptions) -> ModeOptions:
    """Check prompts (token ids) and a mode against a checkpoint; the options with every unset field filled from
    the checkpoint's training block. A mode that runs more MASK rows in a row than that block warns: those rows'
    predictions were never trained, whatever the decoder does with them (method §3)."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_prompt(p, config.vocab_size, i)
    if options.needs_mask and config.mask_token_id is None:
        raise ValueError(
            f"mode {options.mode!r} needs a FLARE checkpoint with a mask token (config.json "
            "'flare.mask_token_id'); this is a plain AR checkpoint: decode it with mode 'causal', or convert it "
            "with `flare convert`")
    resolved = options.resolve(config.trained_block)
    if config.block_size is not None and resolved.mask_rows > config.block_size:
        warnings.warn(
            f"mode {resolved.label()!r} runs {resolved.mask_rows} MASK rows in a row, but this checkpoint was "
            f"trained on noisy blocks of {config.block_size} (config.json flare.block_size): predictions past that "
            f"are untrained, so expect poor drafts or accuracy; choose a block with at most {config.block_size} "
            "MASK rows", stacklevel=3)
    return resolved
