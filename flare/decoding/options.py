"""Per-mode decoding options, each default defined once here (the CLI, engine and server take them from here)."""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_POLICIES = ("exact_truncated", "argmax_full_verify", "argmax_truncated")


@dataclass
class CausalOptions:
    pass


@dataclass
class ArTrustOptions:
    # One round = one forward over [pending, N-1 drafts, N-1 MASK rows]: 1..N tokens per forward. N-1 MASK rows
    # match a model trained with block size N-1 (3 for the default N = 4, the released recipe).
    gen_block: int = 4
    # exact_truncated: drafts sampled from the same filtered law the target uses (exact);
    # argmax_full_verify: argmax drafts, full speculative test against the target law (exact);
    # argmax_truncated: argmax drafts accepted whenever the target law allows them (approximate, faster).
    draft_policy: str = "exact_truncated"

    def __post_init__(self) -> None:
        if self.gen_block < 2:
            raise ValueError(f"gen_block (N) must be >= 2, got {self.gen_block}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"draft_policy must be one of {DRAFT_POLICIES}, got {self.draft_policy!r}")


@dataclass
class BlockOptions:
    """Block-wise parallel denoising: threshold commits (at least one per step, all at the last step) or, with
    ``steps`` set, a fixed number of steps that each commit the most confident share of the block."""

    block_size: int
    threshold: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if (self.threshold is None) == (self.steps is None):
            raise ValueError("give exactly one of threshold and steps")


@dataclass
class DiffusionTrustOptions(BlockOptions):
    # Block [seed, MASK x (block_size - 1)]; commit positions whose sampled token has untempered probability
    # above the threshold.
    block_size: int = 3
    threshold: float | None = 0.95


@dataclass
class LowConfidenceOptions(BlockOptions):
    # SDAR-style: a block of MASK rows, threshold 0.9.
    block_size: int = 4
    threshold: float | None = 0.9


@dataclass
class LladaOptions(BlockOptions):
    # LLaDA-style low-confidence remasking: a block of 32 MASK rows decoded in a fixed number of steps.
    block_size: int = 32
    steps: int | None = 16
