"""The one step clock every method reads.

A pipeline call starts when its scheduler's ``set_timesteps`` runs and a denoising step ends when
``scheduler.step`` returns; between the two, each denoiser forward is described by a
``StepContext``. No method counts steps by itself and nothing needs the step count up front.
"""

from __future__ import annotations

from dataclasses import dataclass

# Branch names. "cond"/"uncond" come from diffusers' cache_context around per-branch calls;
# a forward that carries both halves of a doubled CFG batch is "cond_uncond"; a pipeline that
# opens no cache context and runs without CFG is "default". A per-branch pipeline that opens no
# cache context (Chroma, Lumina 2) gets its branches from the order of its calls within a step.
COND = "cond"
UNCOND = "uncond"
COND_UNCOND = "cond_uncond"
DEFAULT = "default"
# diffusers' guiders (ClassifierFreeGuidance and the guiders of modular pipelines, HunyuanVideo 1.5,
# HunyuanImage 2.1) name each denoiser call's cache context after the prediction it makes.
GUIDER_BRANCHES = {"pred_cond": COND, "pred_uncond": UNCOND}


@dataclass(frozen=True)
class StepContext:
    """Where the sampling loop is, for one denoiser forward."""

    call_index: int  # 1 for the first pipeline call after accelerate(), then 2, ...
    step_index: int  # 0-based scheduler step within the call
    num_steps: int | None  # len(scheduler.timesteps) when known
    timestep: float | None  # the denoiser's timestep argument (first element)
    branch: str  # "cond", "uncond", "cond_uncond" or "default": the key of per-branch state
    branches_in_batch: tuple[str, ...]  # CFG branches this forward evaluates, e.g. ("uncond", "cond")
    grid: tuple[int, ...]  # token grid of the latent input: (frames, height, width) or (height, width)
    batch_size: int

    @property
    def is_first_step(self) -> bool:
        return self.step_index == 0

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step_index == self.num_steps - 1


class StepClock:
    """Counts calls and steps from scheduler events; hands out the current ``StepContext``."""

    def __init__(self) -> None:
        self.call_index = 0
        self.step_index = 0
        self.num_steps: int | None = None
        self._current: StepContext | None = None
        self._in_call = False
        self.forwards_in_step = 0  # denoiser forwards begun since the step started

    @property
    def current(self) -> StepContext:
        """The context of the denoiser forward in progress, which the runtime's denoiser hook makes. A hook
        below it that finds none was reached without it: something replaced the denoiser's ``forward``
        after ``accelerate``, dropping the outermost hook while the inner ones stayed."""
        if self._current is None:
            raise RuntimeError(
                "diffaccel: a block hook ran without the denoiser hook above it, so the denoiser's forward was "
                "replaced after diffaccel.accelerate (accelerate's add_hook_to_module does this when offloading is "
                "applied a second time, e.g. a repeated enable_model_cpu_offload). Call diffaccel.remove(pipe) "
                "before changing the offloading, then accelerate again."
            )
        return self._current

    @current.setter
    def current(self, context: StepContext | None) -> None:
        self._current = context

    def begin_call(self, num_steps: int | None) -> None:
        self.call_index += 1
        self.step_index = 0
        self.num_steps = num_steps
        self._current = None
        self._in_call = True
        self.forwards_in_step = 0

    def end_step(self) -> None:
        self.step_index += 1
        self.forwards_in_step = 0

    @property
    def in_call(self) -> bool:
        return self._in_call

    def make_context(
        self,
        *,
        timestep: float | None,
        branch: str,
        branches_in_batch: tuple[str, ...],
        grid: tuple[int, ...],
        batch_size: int,
    ) -> StepContext:
        self.current = StepContext(
            call_index=self.call_index,
            step_index=self.step_index,
            num_steps=self.num_steps,
            timestep=timestep,
            branch=branch,
            branches_in_batch=branches_in_batch,
            grid=grid,
            batch_size=batch_size,
        )
        return self.current
