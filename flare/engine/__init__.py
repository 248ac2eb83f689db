"""The serving engine: request bookkeeping and scheduling (pure Python), then batched steps over cache slots.

Built so far: ``Sequence`` and ``Scheduler``, which import no torch and are tested with plain objects. The
runner (one forward per step over every running sequence's cache slot, each sequence advanced by its own mode's
strategy) and the text-level ``LLM`` come next.
"""

from flare.engine.scheduler import QueueFull, ScheduledStep, Scheduler, SchedulerConfig
from flare.engine.sequence import Sequence, SequenceStatus

__all__ = ["QueueFull", "ScheduledStep", "Scheduler", "SchedulerConfig", "Sequence", "SequenceStatus"]
