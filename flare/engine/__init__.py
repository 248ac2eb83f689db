"""Execution: how decoding lanes become forwards over cache slots, and the serving engine around them.

``Stepper`` runs lanes of any mode over the cache slots of one runner (``CachedRunner``, or the cache-free
``ReferenceRunner`` the tests use as ground truth), one forward per step. ``decode`` is a stepper with one lane;
``Engine`` (token ids) queues requests, admits them into slots and steps every running sequence; ``LLM``
(``flare.engine.llm``) wraps it with text. Request bookkeeping and scheduling are pure Python.
"""

from flare.engine.decode import decode
from flare.engine.engine import Engine, EngineConfig, EngineStats, RequestError, RequestOutput
from flare.engine.llm import LLM, Completion, TextStream
from flare.engine.result import DecodeResult
from flare.engine.scheduler import QueueFull, ScheduledStep, Scheduler, SchedulerConfig
from flare.engine.sequence import Sequence, SequenceStatus
from flare.engine.stepper import Admission, Stepper

__all__ = ["LLM", "Admission", "Completion", "DecodeResult", "Engine", "EngineConfig", "EngineStats", "QueueFull",
           "RequestError", "RequestOutput", "ScheduledStep", "Scheduler", "SchedulerConfig", "Sequence",
           "SequenceStatus", "Stepper", "TextStream", "decode"]
