"""The serving engine: request bookkeeping and scheduling (pure Python), batched steps over cache slots.

``Engine`` (token ids) queues requests, admits them into cache slots, and steps every running sequence, of any
decoding mode, in one forward per step through ``flare.decoding.Stepper``. ``LLM`` wraps it with text.
"""

from flare.engine.engine import Engine, EngineConfig, EngineStats, RequestError, RequestOutput
from flare.engine.scheduler import QueueFull, ScheduledStep, Scheduler, SchedulerConfig
from flare.engine.sequence import Sequence, SequenceStatus

__all__ = ["Engine", "EngineConfig", "EngineStats", "QueueFull", "RequestError", "RequestOutput", "ScheduledStep",
           "Scheduler", "SchedulerConfig", "Sequence", "SequenceStatus"]
