"""A decoding mode and its options as ONE typed object, from every front door to the lane.

Each mode's options are a frozen dataclass that names its mode (``options.mode``); the object is what travels:
``decode``, ``Engine.add_request``, ``LLM.generate``, the server, ``flare eval/bench`` and the lm-eval adapter
all take it. It is written in two forms, each read by one function here:

- text ``mode[:key=value...]`` (``parse_mode``): ``--modes`` lists, ``flare serve --mode``, benchmarks;
- a JSON object ``{"mode": ..., key: value}`` (``mode_from_json``): the server's ``flare`` request field;

and both go through ``make_options``, which converts each value by the dataclass field's type (never by
guessing). Block-related fields left unset (None) are filled from the checkpoint by ``resolve``: with the
noisy block b the checkpoint was trained at (config.json ``flare.block_size``; ``DEFAULT_BLOCK_SIZE`` when it
records none), AR-Trust drafts with b MASK rows (``gen_block`` = b + 1) and the block decoders run blocks of b
(Diffusion-Trust's ``[seed, MASK x (b-1)]``, the method's block 3 for b = 3): never more MASK rows in a row than
training supervised (method §3). Each default is defined here, once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

DRAFT_POLICIES = ("exact_truncated", "argmax_full_verify", "argmax_truncated")
REDRAFTS = ("auto", "last", "every", "tree")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModeOptions:
    mode: ClassVar[str]
    needs_mask: ClassVar[bool] = True  # only a FLARE checkpoint (with a [MASK] token) can run it

    def resolve(self, trained_block: int) -> "ModeOptions":
        """These options with every unset field filled from the checkpoint's training block."""
        return self

    @property
    def mask_rows(self) -> int:
        """The longest run of MASK rows one forward of this mode holds (what training must have covered)."""
        return 0

    def given(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a user wrote, or what ``resolve`` filled in)."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) != f.default}

    def label(self) -> str:
        """``low_confidence:block_size=3``: the text ``parse_mode`` reads back."""
        return ":".join([self.mode, *(f"{k}={v}" for k, v in self.given().items())])

    def to_json(self) -> dict[str, Any]:
        """The server's ``flare`` field for these options (``mode_from_json`` reads it back)."""
        return {"mode": self.mode, **self.given()}


@dataclass(frozen=True)
class CausalOptions(ModeOptions):
    mode: ClassVar[str] = "causal"
    needs_mask: ClassVar[bool] = False


@dataclass(frozen=True)
class ArTrustOptions(ModeOptions):
    mode: ClassVar[str] = "ar_trust"
    # One round = one forward over [pending, N-1 drafts, N-1 MASK rows]: 1..N tokens per forward.
    gen_block: int | None = _opt(None, "ar_trust: tokens per round N, drafted by N-1 MASK rows "
                                       "(unset: the checkpoint's training block + 1)")
    draft_policy: str = _opt("exact_truncated", "ar_trust: exact_truncated (drafts from the target's filtered "
                                                "law, exact), argmax_full_verify (exact), argmax_truncated "
                                                "(approximate, faster)")
    redraft: str = _opt("auto", "ar_trust: where the next round's drafts come from: last (one MASK group after "
                                "all drafts; a rejection leaves the next round cold, 1 token), every (a MASK "
                                "group after each acceptance point, N groups: no cold rounds), tree (every, and "
                                "where drafts are argmax picks a branch: a row for the first draft's second "
                                "choice with a group after it, so a rejection that lands on it commits 2 tokens "
                                "and redrafts after them) or auto (batches of up to 2: whichever commits faster on the clock where "
                                "the batch is paced, see pause; unpaced: every for greedy ones, else last)")
    pause: int = _opt(4, "ar_trust: > 0: a batch is paced on the clock (drafting rounds of 1 .. gen_block-1 "
                         "drafts or causal steps, whichever commits faster), unless a sampled sequence in it is "
                         "seeded; there, after two verify rounds in a row that accept no draft, a sequence decodes "
                         "causally (one row, no drafts) for this many steps before drafting again, twice as many "
                         "each time drafting keeps failing (up to 16x); 0 = always draft, unpaced")

    draft_vocab: int = _opt(0, "ar_trust: the MASK rows draft among the first K token ids only (and the end "
                               "tokens): their LM head costs K / V of the whole vocabulary's; the verify rows read "
                               "the whole vocabulary, so decoding stays exact; 0 = the whole vocabulary")

    def __post_init__(self) -> None:
        if self.pause < 0:
            raise ValueError(f"pause must be >= 0, got {self.pause}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.gen_block is not None and self.gen_block < 2:
            raise ValueError(f"gen_block (N) must be >= 2, got {self.gen_block}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"draft_policy must be one of {DRAFT_POLICIES}, got {self.draft_policy!r}")
        if self.redraft not in REDRAFTS:
            raise ValueError(f"redraft must be one of {REDRAFTS}, got {self.redraft!r}")

    def resolve(self, trained_block: int) -> "ArTrustOptions":
        return self if self.gen_block is not None else dataclasses.replace(self, gen_block=trained_block + 1)

    @property
    def mask_rows(self) -> int:
        return self.gen_block - 1


@dataclass(frozen=True)
class BlockOptions(ModeOptions):
    """Block-wise parallel denoising: threshold commits (at least one per step, all at the last step) or, with
    ``steps`` set, a fixed number of steps that each commit the most confident share of the block."""

    seeded: ClassVar[bool] = False  # the block starts with a token sampled from the last causal row
    block_size: int | None = _opt(None, "block modes: block length (unset: the checkpoint's training block)")
    threshold: float | None = _opt(None, "block modes: commit positions whose confidence is above this, in (0, 1]")
    steps: int | None = _opt(None, "block modes: a fixed number of denoising steps per block instead of a "
                                   "threshold")
    lookahead: int = _opt(0, "block modes: 1 = the forward that commits a block also runs the next block as MASK "
                             "rows and takes it as that block's first denoising step (one forward fewer per "
                             "block; with a seed, which that step cannot see yet, it commits only positions "
                             "above the threshold); 0 = a commit forward of its own (the method's)")

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.threshold is not None and self.steps is not None:
            raise ValueError("give one of threshold and steps, not both")
        if self.lookahead not in (0, 1):
            raise ValueError(f"lookahead must be 0 or 1, got {self.lookahead}")
        if self.lookahead and self.seeded and self.threshold is None:
            raise ValueError(f"{self.mode}: lookahead needs a threshold (a seeded block's look-ahead step commits "
                             "only confident positions)")

    def resolve(self, trained_block: int) -> "BlockOptions":
        if self.block_size is not None:
            return self
        return dataclasses.replace(self, block_size=trained_block)

    @property
    def mask_rows(self) -> int:
        return self.block_size - int(self.seeded and not self.lookahead)


@dataclass(frozen=True)
class DiffusionTrustOptions(BlockOptions):
    # Block [seed, MASK x (block_size - 1)]; commit positions whose sampled token has untempered probability
    # above the threshold.
    mode: ClassVar[str] = "diffusion_trust"
    seeded: ClassVar[bool] = True
    threshold: float | None = _opt(0.95, BlockOptions.__dataclass_fields__["threshold"].metadata["help"])


@dataclass(frozen=True)
class LowConfidenceOptions(BlockOptions):
    # SDAR-style: a block of MASK rows, threshold 0.9.
    mode: ClassVar[str] = "low_confidence"
    threshold: float | None = _opt(0.9, BlockOptions.__dataclass_fields__["threshold"].metadata["help"])


@dataclass(frozen=True)
class LladaOptions(BlockOptions):
    # LLaDA-style low-confidence remasking: a block of MASK rows decoded in a fixed number of steps (unset: half
    # the block, rounded up: two tokens per step).
    mode: ClassVar[str] = "llada"

    def resolve(self, trained_block: int) -> "LladaOptions":
        out = super().resolve(trained_block)
        if out.steps is None and out.threshold is None:
            out = dataclasses.replace(out, steps=-(-out.block_size // 2))
        return out


OPTIONS: dict[str, type[ModeOptions]] = {
    cls.mode: cls for cls in (CausalOptions, ArTrustOptions, DiffusionTrustOptions, LowConfidenceOptions,
                              LladaOptions)
}


def option_type(cls: type[ModeOptions], name: str) -> type:
    """The value type of option ``name``: int for ``int | None``, and so on."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(mode: str, name: str, tp: type, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"mode {mode!r}: option {name} takes {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ValueError(f"mode {mode!r}: option {name} takes {tp.__name__}, got {value!r}")
    return value


def make_options(mode: str, values: Mapping[str, Any] | None = None) -> ModeOptions:
    """The options of ``mode`` from name -> value (text or typed), converted by each field's type. Unknown modes
    and option names are errors naming what exists."""
    if mode not in OPTIONS:
        raise ValueError(f"unknown decoding mode {mode!r}; available: {', '.join(OPTIONS)}")
    cls = OPTIONS[mode]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ValueError(f"mode {mode!r} takes options {sorted(known) or 'none'}, not {unknown}")
    return cls(**{k: _convert(mode, k, option_type(cls, k), v) for k, v in (values or {}).items()})


def parse_mode(text: str) -> ModeOptions:
    """``low_confidence:block_size=3`` -> LowConfidenceOptions(block_size=3)."""
    mode, *pairs = text.strip().split(":")
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"mode option {pair!r} in {text!r} is not key=value")
        values[key.strip()] = value
    return make_options(mode.strip(), values)


def parse_modes(text: str) -> list[ModeOptions]:
    """A comma-separated list of ``parse_mode`` entries."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("no modes given")
    return [parse_mode(e) for e in entries]


def mode_from_json(obj: Mapping[str, Any], default: "str | ModeOptions") -> ModeOptions:
    """The server's ``flare`` field ``{"mode": ..., <options>}``. Without a mode it is the server's ``default``
    (options or their text), with the options given here replacing the default's."""
    values = dict(obj)
    mode = values.pop("mode", None)
    if mode is not None and not isinstance(mode, str):
        raise ValueError(f"flare.mode must be a string, got {mode!r}")
    if mode is None:
        default = as_options(default)
        mode, values = default.mode, {**default.given(), **values}
    return make_options(mode, values)


def as_options(mode: "str | ModeOptions | None", default: "str | ModeOptions" = "causal") -> ModeOptions:
    """A mode given as options (returned as is), as ``parse_mode`` text, or None (``default``)."""
    mode = default if mode is None else mode
    return mode if isinstance(mode, ModeOptions) else parse_mode(mode)
