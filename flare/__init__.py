"""flare-lm: one hybrid checkpoint, three ways to decode (causal, AR-Trust, Diffusion-Trust)."""

from flare.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "load_model", "__version__"]


def load_model(path, device="cpu", dtype=None):
    """Load a Hugging Face checkpoint directory (config.json + safetensors) as a FlareModel."""
    from flare.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype)
