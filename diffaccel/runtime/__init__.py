"""The step runtime every method plugs into: clock, per-branch state, statistics, hooks."""

from .context import COND, COND_UNCOND, DEFAULT, UNCOND, StepClock, StepContext
from .runtime import PIPE_ATTRIBUTE, RUNTIME_HOOK, Runtime, remove_hook
from .state import BranchStates, RunStats

__all__ = [
    "COND",
    "COND_UNCOND",
    "DEFAULT",
    "UNCOND",
    "BranchStates",
    "PIPE_ATTRIBUTE",
    "RUNTIME_HOOK",
    "RunStats",
    "Runtime",
    "StepClock",
    "StepContext",
    "remove_hook",
]
