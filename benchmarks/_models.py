"""What the benchmarks that load a model share: the ``--size`` / ``--device`` / ``--dtype`` flags (resolved for a
checkpoint's stored dtype and size), the seeded random checkpoints behind ``--size``, and a device sync for timers.

Sizes: ``tiny`` and ``small`` are built with transformers (flare.testing.checkpoints.save_tiny_checkpoint, fp32);
``real`` is Qwen3.5-0.8B's shape (flare.testing.checkpoints.REAL_QWEN3_5: hidden 1024, 24 layers of which 6
gated attention, tied 248,320 vocabulary, 0.75B parameters), written straight to bf16 safetensors by
``save_random_hybrid`` in seconds, as the released Qwen3.5 checkpoints are stored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Valid Qwen3_5TextConfig overrides of save_tiny_checkpoint ("tiny" = its defaults); "real" is built elsewhere.
SIZES: dict[str, dict | None] = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=1024,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, linear_num_key_heads=4,
                  linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
    "real": None,
}
SIZE_HELP = ("random model size: tiny = hidden 64, 4 layers, vocab 96; small = hidden 256, 8 layers, vocab 1024 "
             "(both fp32); real = Qwen3.5-0.8B-shaped, hidden 1024, 24 layers (18 GDN + 6 gated attention), tied "
             "vocab 248,320, 0.75B params, stored bf16")
DTYPES = ("auto", "float32", "bfloat16")


def add_device_args(ap: argparse.ArgumentParser, dtype: bool = True) -> None:
    ap.add_argument("--device", default=None, help="where to run (cpu, cuda, cuda:1); default: CUDA when "
                    "present, else the CPU (flare.device.pick_device)")
    if dtype:
        ap.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and activations dtype; auto = "
                        "flare.device.pick_dtype: bf16 where the device computes it natively (CUDA, CPUs with "
                        "AMX or AVX-512-BF16; on a CPU for models of 32M parameters or more), else the "
                        "checkpoint's stored dtype")


def resolve(a: argparse.Namespace, stored: torch.dtype = torch.float32,
            params: int | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for by ``--device`` / ``--dtype`` (``auto`` resolved against ``stored`` and the
    model's parameter count, as ``flare.device.pick_dtype`` does)."""
    from flare.device import pick_device, pick_dtype

    device = pick_device(a.device)
    requested = getattr(a, "dtype", "auto")
    return device, pick_dtype(device, None if requested == "auto" else requested, stored, params)


def resolve_checkpoint(a: argparse.Namespace, path: str | Path) -> tuple[torch.device, torch.dtype]:
    """``resolve`` for a checkpoint directory: its stored dtype and size read from the safetensors headers."""
    from flare.checkpoint import parameter_count, stored_dtype

    return resolve(a, stored_dtype(path), parameter_count(path))


def random_checkpoint(path: str | Path, size: str, seed: int = 0) -> Path:
    """Write the seeded random qwen3_5 checkpoint of ``size`` to ``path`` (no tokenizer); returns ``path``."""
    from flare.testing.checkpoints import save_random_hybrid, save_tiny_checkpoint

    if SIZES[size] is None:
        return save_random_hybrid(path, seed, dtype=torch.bfloat16)
    quiet_transformers()
    return save_tiny_checkpoint(path, "qwen3_5", seed=seed, tokenizer=False, **SIZES[size])


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # its "falling back to the PyTorch reference kernel" notes
    transformers.utils.logging.disable_progress_bar()


def load_transformers(path: str | Path, device: torch.device, dtype: torch.dtype):
    """transformers' own implementation of the checkpoint (Qwen3_5ForCausalLM for a Qwen3.5 text model; with
    neither flash-linear-attention nor causal-conv1d installed it runs its pure-PyTorch GDN fallback)."""
    import transformers

    from flare.config import ModelConfig

    quiet_transformers()
    config = ModelConfig.from_file(path)
    cls = (transformers.Qwen3_5ForCausalLM if config.family == "qwen3_5" and config.weight_prefix == "model."
           else transformers.AutoModelForCausalLM)
    return cls.from_pretrained(str(path), dtype=dtype).to(device).eval()


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a host timer measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
