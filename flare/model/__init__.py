from flare.model.cache import CommitRecord, ModelCache
from flare.model.hybrid import FlareModel

__all__ = ["CommitRecord", "FlareModel", "ModelCache"]
