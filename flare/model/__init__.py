from flare.model.cache import ModelCache
from flare.model.hybrid import FlareModel

__all__ = ["FlareModel", "ModelCache"]
