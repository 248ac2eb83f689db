from flare.model.cache import CommitRecord, ModelCache
from flare.model.hybrid import FlareModel
from flare.model.layers import frozen_weights

__all__ = ["CommitRecord", "FlareModel", "ModelCache", "frozen_weights"]
