"""Per-branch method state and the run statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

S = TypeVar("S")


class BranchStates(Generic[S]):
    """One state object per CFG branch, created on first use and dropped on reset.

    Keyed by ``StepContext.branch`` so the conditional and unconditional passes never share a cache.
    """

    def __init__(self, factory: Callable[[], S]) -> None:
        self._factory = factory
        self._states: dict[str, S] = {}

    def get(self, branch: str) -> S:
        state = self._states.get(branch)
        if state is None:
            state = self._states[branch] = self._factory()
        return state

    def reset(self, branch: str | None = None) -> None:
        if branch is None:
            self._states.clear()
        else:
            self._states.pop(branch, None)

    def __len__(self) -> int:
        return len(self._states)


@dataclass
class RunStats:
    """What happened during one pipeline call (or, summed, since ``accelerate``)."""

    calls: int = 0
    steps: int = 0
    denoiser_forwards: int = 0  # forward passes of the denoiser
    denoiser_calls_by_branch: Counter = field(default_factory=Counter)  # per CFG branch evaluated
    blocks_per_forward: int = 0
    blocks_skipped: int = 0
    state_resets: int = 0  # resolution / batch changes inside a call that dropped cached state
    counters: Counter = field(default_factory=Counter)  # method-specific counts, e.g. "cache_hits"

    @property
    def denoiser_calls(self) -> int:
        return sum(self.denoiser_calls_by_branch.values())

    @property
    def blocks_computed(self) -> int:
        return self.denoiser_forwards * self.blocks_per_forward - self.blocks_skipped

    def add(self, other: "RunStats") -> None:
        self.calls += other.calls
        self.steps += other.steps
        self.denoiser_forwards += other.denoiser_forwards
        self.denoiser_calls_by_branch.update(other.denoiser_calls_by_branch)
        self.blocks_per_forward = other.blocks_per_forward
        self.blocks_skipped += other.blocks_skipped
        self.state_resets += other.state_resets
        self.counters.update(other.counters)

    def as_dict(self) -> dict:
        total_blocks = self.denoiser_forwards * self.blocks_per_forward
        data = {
            "calls": self.calls,
            "steps": self.steps,
            "denoiser_forwards": self.denoiser_forwards,
            "denoiser_calls": self.denoiser_calls,
            "denoiser_calls_by_branch": dict(self.denoiser_calls_by_branch),
            "blocks_computed": self.blocks_computed,
            "blocks_skipped": self.blocks_skipped,
            "block_skip_ratio": (self.blocks_skipped / total_blocks) if total_blocks else 0.0,
            "state_resets": self.state_resets,
        }
        data.update(sorted(self.counters.items()))
        return data
