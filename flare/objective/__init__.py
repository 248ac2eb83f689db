"""The FLARE training objective: noise, complementary views, two-stream forward, token-equal loss."""

from flare.objective.loss import FlareObjective, LossParts, ObjectiveConfig
from flare.objective.noise import NoisyViews, sample_views

__all__ = ["FlareObjective", "LossParts", "NoisyViews", "ObjectiveConfig", "sample_views"]
