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
    # Blocks the forwards hold in all; set when denoisers of different depths are summed (``merged``).
    blocks_total: int | None = None

    @property
    def denoiser_calls(self) -> int:
        return sum(self.denoiser_calls_by_branch.values())

    @property
    def total_blocks(self) -> int:
        return self.denoiser_forwards * self.blocks_per_forward if self.blocks_total is None else self.blocks_total

    @property
    def blocks_computed(self) -> int:
        return self.total_blocks - self.blocks_skipped

    @classmethod
    def merged(cls, main: "RunStats", parts: list["RunStats"]) -> "RunStats":
        """The steps of ``main`` with the forwards, blocks and counters of every part (one per denoiser of a
        pipeline whose steps several models run, e.g. Wan 2.2's two experts: each sees every step)."""
        out = cls(calls=main.calls, steps=main.steps, blocks_per_forward=main.blocks_per_forward, blocks_total=0)
        for part in parts:
            out.denoiser_forwards += part.denoiser_forwards
            out.denoiser_calls_by_branch.update(part.denoiser_calls_by_branch)
            out.blocks_total += part.total_blocks
            out.blocks_skipped += part.blocks_skipped
            out.state_resets += part.state_resets
            out.counters.update(part.counters)
        return out

    def add(self, other: "RunStats") -> None:
        """Sum ``other`` (a later part of the same call, e.g. a bottleneck stage) into this one."""
        if self.blocks_total is not None or other.blocks_total is not None:
            self.blocks_total = self.total_blocks + other.total_blocks
        self.calls += other.calls
        self.steps += other.steps
        self.denoiser_forwards += other.denoiser_forwards
        self.denoiser_calls_by_branch.update(other.denoiser_calls_by_branch)
        self.blocks_per_forward = other.blocks_per_forward
        self.blocks_skipped += other.blocks_skipped
        self.state_resets += other.state_resets
        self.counters.update(other.counters)

    def as_dict(self, steps: bool = True) -> dict:
        """The report; ``steps=False`` leaves out calls and steps (one denoiser's share of a call's steps)."""
        total_blocks = self.total_blocks
        data = {"calls": self.calls, "steps": self.steps} if steps else {}
        data |= {
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
