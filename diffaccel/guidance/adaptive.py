"""Adaptive guidance: skip the unconditional branch of classifier-free guidance once it stops mattering.

AG (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487, AAAI 2025): the conditional and unconditional predictions converge along the sampling
trajectory. At every step where both are evaluated, their cosine similarity is measured; once it reaches
the threshold gamma_bar (and from ``min_steps`` on), the unconditional branch is no longer evaluated for
the rest of the call and the conditional prediction takes its place, so the pipeline's own CFG formula
``u + s * (c - u)`` yields ``c``. LinearAG (same paper) keeps guidance instead of dropping it on some steps:
there the unconditional prediction is replaced by an affine combination of quantities already computed,
with per-step coefficients fitted offline (``diffaccel tune guidance``). "interval" is the familiar fixed
policy: guidance only within a step interval.

How a skip happens, per CFG layout (the runtime says which one a forward is):

* per-branch calls (``cache_context("cond"/"uncond")``: CogView4, Wan, Flux/Qwen-Image/HunyuanVideo true
  CFG): a skipped "uncond" call returns at once, without running the denoiser, the conditional prediction
  of the same step (or the LinearAG estimate), in the structure the conditional call returned. Pipelines
  that call "uncond" first get the conditional prediction computed during the "uncond" call, from the last
  conditional call's arguments with this step's latents and timestep; the "cond" call that follows returns
  it, after checking it was made with the same arguments.
* one doubled batch (PixArt, SD3, Sana, CogVideoX, LTX, SD UNets): only the conditional half runs (every
  batch-shaped argument is cut to its second half, diffusers' order being ``[uncond, cond]``), and the
  output is ``[c, c]`` (or ``[estimate, c]``).

A skipped branch never reaches the denoiser, so block hooks below never see it and a cache's state for
that branch stays untouched; ``Runtime.narrow_forward`` keeps ``denoiser_calls_by_branch`` true to what
ran, and the conditional-only forward of a doubled batch runs under the "cond" state key.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import ModelHook

from diffaccel.config import MethodConfig, check_choice, check_float, check_int, register_config
from diffaccel.pipelines.adapters import argument_position, get_argument, is_tensor_list, set_argument
from diffaccel.registry import AccelTarget, register_method
from diffaccel.runtime import COND, COND_UNCOND, UNCOND

from .layout import (cond_half_arguments, latent_prediction, prediction_of, same_arguments, same_tensor,
                     with_other_outputs, with_prediction)
from .rules import (
    CARRY_GUIDANCE,
    COMPUTE,
    DROP,
    LINEAR_TERMS,
    cosine_similarity,
    crosses,
    linear_ag_estimate,
    uncond_action,
)

logger = logging.getLogger("diffaccel")

GUIDANCE_HOOK = "diffaccel.guidance"
MODES = ("ag", "linear", "interval")
# The modes that read each field; setting a field its mode ignores is an error, not a silent no-op.
FIELD_MODES = {
    "threshold": ("ag", "linear"),
    "min_steps": ("ag", "linear"),
    "final_steps": ("ag", "linear"),
    "refresh_every": ("linear",),
    "coefficients": ("linear",),
    "interval": ("interval",),
}
STATE_KEY = "cfg"  # the state spans both branches of a CFG pair: one entry, dropped at every call start

# Counters in diffaccel.stats(pipe).
SKIPPED = "guidance_skipped_uncond"  # unconditional evaluations not run (dropped or estimated)
ESTIMATED = "guidance_estimated_uncond"  # of those, replaced by the LinearAG estimate


@register_config
@dataclass(frozen=True)
class AdaptiveGuidanceConfig(MethodConfig):
    """Skip the unconditional CFG branch where it no longer matters (``guidance="adaptive"``).

    Args:
        mode: ``"ag"`` (drop guidance once the predictions agree), ``"linear"`` (LinearAG: also estimate the
            unconditional prediction on alternate steps before that) or ``"interval"`` (guidance only within
            ``interval``). ``guidance="linear"`` / ``guidance="interval"`` select the other two with their
            defaults (``LinearGuidanceConfig``, ``IntervalGuidanceConfig``).
        threshold: gamma_bar; once the cosine similarity of the conditional and unconditional predictions
            reaches it, the unconditional branch is skipped for the rest of the call. The paper sweeps
            0.991 / 0.994 / 0.996 (SSIM-vs-NFE curves) without naming one default; 0.994 is the middle of
            that sweep. It depends on the model: calibrate it (``diffaccel tune guidance --target-saving``).
            Above 1 never skips (off: bit-identical to plain CFG); -1 skips from ``min_steps`` on.
        min_steps: the first ``min_steps`` steps always evaluate both branches. The paper has no such
            floor (its threshold alone keeps CFG early), hence 0; raise it for models whose predictions
            agree from the first step.
        final_steps: the last ``final_steps`` steps of a call evaluate both branches again, whatever the
            truncation. Not in the paper (0, its policy); on the reference image model the two predictions
            part again over the last steps (mean cosine 0.998 mid-way, 0.995 at the last of 20 steps), and
            the guidance there sets attributes the judge reads. Needs the call's step count.
        refresh_every: LinearAG only: before the truncation, the unconditional branch is evaluated on every
            ``refresh_every``-th step and estimated on the others; the paper alternates (2). 1 never
            estimates (LinearAG then equals AG).
        coefficients: LinearAG only: one row (a, b, c, d) per step of the call, for
            ``eps_u(t) ~ a*eps_c(t) + b*eps_c(t-1) + c*eps_u(t-1) + d*x_t``, fitted by least squares on
            plain CFG runs (``diffaccel.guidance.fit_linear_guidance``); the row of step 0 is never used.
            Empty: every estimate carries the previous step's guidance over, (1, -1, 1, 0), training-free.
            A call with another number of steps than rows falls back to that, with a warning.
        interval: ``"interval"`` only: (start, end) as fractions of the call's steps; guidance on steps
            ``round(start*N) <= i < round(end*N)``, the conditional prediction alone elsewhere. (0, 0.5)
            keeps CFG in the first half, where the paper finds it matters; (0, 1) is off.
    """

    slot = "guidance"
    method = "adaptive"

    mode: str = "ag"
    threshold: float = 0.994
    min_steps: int = 0
    final_steps: int = 0
    refresh_every: int = 2
    coefficients: tuple[tuple[float, float, float, float], ...] = ()
    interval: tuple[float, float] = (0.0, 0.5)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_choice(name, "mode", self.mode, MODES)
        check_float(name, "threshold", self.threshold, minimum=-1.0)
        check_int(name, "min_steps", self.min_steps, minimum=0)
        check_int(name, "final_steps", self.final_steps, minimum=0)
        check_int(name, "refresh_every", self.refresh_every, minimum=1)
        object.__setattr__(self, "coefficients", _coefficient_rows(name, self.coefficients))
        object.__setattr__(self, "interval", _interval(name, self.interval))
        for f in fields(self):
            modes = FIELD_MODES.get(f.name)
            if modes is not None and self.mode not in modes and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"{name}.{f.name} does nothing in mode={self.mode!r}; it is used by mode "
                    f"{' / '.join(repr(m) for m in modes)}. Leave it at its default or change the mode."
                )


@register_config
@dataclass(frozen=True)
class LinearGuidanceConfig(AdaptiveGuidanceConfig):
    """``guidance="linear"``: LinearAG with its defaults; the fields are ``AdaptiveGuidanceConfig``'s."""

    method = "linear"
    mode: str = "linear"
    min_steps: int = 1  # step 0 has no previous predictions to estimate from

    def __post_init__(self) -> None:
        _require_mode(self, "linear")
        super().__post_init__()


@register_config
@dataclass(frozen=True)
class IntervalGuidanceConfig(AdaptiveGuidanceConfig):
    """``guidance="interval"``: guidance only within ``interval``; the fields are ``AdaptiveGuidanceConfig``'s."""

    method = "interval"
    mode: str = "interval"

    def __post_init__(self) -> None:
        _require_mode(self, "interval")
        super().__post_init__()


def _require_mode(config: AdaptiveGuidanceConfig, mode: str) -> None:
    if config.mode != mode:
        raise ValueError(
            f"{type(config).__name__} is mode={mode!r}, got mode={config.mode!r}; "
            f"use AdaptiveGuidanceConfig(mode={config.mode!r}) instead."
        )


def _coefficient_rows(owner: str, value: Any) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{owner}.coefficients must be a sequence of ({', '.join(LINEAR_TERMS)}) rows, got {value!r}.")
    rows = []
    for index, row in enumerate(value):
        ok = isinstance(row, (tuple, list)) and len(row) == len(LINEAR_TERMS)
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        if not ok:
            raise ValueError(
                f"{owner}.coefficients[{index}] must be {len(LINEAR_TERMS)} finite numbers "
                f"(weights of {', '.join(LINEAR_TERMS)}), got {row!r}."
            )
        rows.append(tuple(float(v) for v in row))
    return tuple(rows)


def _interval(owner: str, value: Any) -> tuple[float, float]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ValueError(
            f"{owner}.interval must be (start, end) fractions of the steps with 0 <= start <= end <= 1, got {value!r}."
        )
    return (float(value[0]), float(value[1]))


# ------------------------------------------------------------------------------------------ state


class StepRecord:
    """What one step has produced so far: latents, conditional prediction, unconditional one used."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.latents: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None
        self.cond_output: Any = None  # what the conditional call returned (its structure is reused)
        self.uncond: torch.Tensor | None = None  # evaluated, estimated or (dropped) the conditional one
        self.uncond_real = False
        self.measured = False


class GuidanceState:
    """One pipeline call's guidance state (created at the first forward, dropped at every call start)."""

    def __init__(self) -> None:
        self.truncated = False  # the similarity reached the threshold at some evaluated step
        self.truncated_at: int | None = None
        self.similarities: dict[int, float] = {}  # step -> measured cosine similarity
        self.current: StepRecord | None = None
        self.previous: StepRecord | None = None
        self.cond_call: tuple[tuple, dict] | None = None  # the last conditional call's arguments
        self.precomputed: tuple[int, Any, tuple, dict] | None = None  # (step, output, args, kwargs)
        self.precompute_ok = True
        self.warned: set[str] = set()

    def record(self, step: int) -> StepRecord:
        if self.current is None or self.current.step != step:
            self.previous = self.current
            self.current = StepRecord(step)
        return self.current

    def history_for(self, step: int, latents: torch.Tensor | None) -> StepRecord | None:
        """The previous step's record if LinearAG can estimate from it at ``step``."""
        prev = self.previous
        if prev is None or prev.step != step - 1 or prev.cond is None or prev.uncond is None:
            return None
        if latents is None or prev.latents is None or prev.latents.shape != latents.shape:
            return None
        return prev


# ------------------------------------------------------------------------------------------ hook


Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class AdaptiveGuidanceHook(ModelHook):
    """On the denoiser, inside the runtime's hook: decides per forward whether the uncond branch runs."""

    _is_stateful = False  # state lives in the runtime's BranchStates, reset there

    def __init__(self, config: AdaptiveGuidanceConfig, runtime, states, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        adapter = runtime.adapter
        self.hidden_arg = adapter.hidden_arg
        self.timestep_arg = adapter.timestep_arg
        self.hidden_position = argument_position(denoiser, adapter.hidden_arg)
        self.timestep_position = argument_position(denoiser, adapter.timestep_arg)
        forward = inspect.unwrap(type(denoiser).forward)
        self.positional_names = list(inspect.signature(forward).parameters)[1:]
        self.cond_half = adapter.cfg_batch_order.index(COND)  # which half of a doubled batch is conditional
        # Called with (step, latents, cond, uncond) at every step where both branches were evaluated;
        # the tuner records plain CFG trajectories through it.
        self.observers: list[Observer] = []

    # ------------------------------------------------------------------ dispatch

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.runtime.clock.current
        if ctx is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if ctx.branch == COND:
            return self._cond_call(ctx, args, kwargs)
        if ctx.branch == UNCOND:
            return self._uncond_call(ctx, args, kwargs)
        if ctx.branch == COND_UNCOND:
            return self._doubled_call(ctx, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)  # no CFG in this forward

    # ------------------------------------------------------------------ per-branch calls

    def _cond_call(self, ctx, args: tuple, kwargs: dict):
        state: GuidanceState = self.states.get(STATE_KEY)
        self._note_no_cfg(state, ctx.step_index)
        reused = self._take_precomputed(state, ctx.step_index, args, kwargs)
        if reused is not None:
            return reused
        output = self.fn_ref.original_forward(*args, **kwargs)
        self._after_cond(state, ctx.step_index, args, kwargs, output)
        return output

    def _uncond_call(self, ctx, args: tuple, kwargs: dict):
        state: GuidanceState = self.states.get(STATE_KEY)
        step = ctx.step_index
        latents = self._latents(args, kwargs)
        action = self._resolve_uncond(state, ctx, args, kwargs, latents)
        record = state.record(step)
        if action == COMPUTE:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self._after_uncond(state, step, latents, latent_prediction(prediction_of(output), latents))
            return output
        value = self._skipped_value(state, action, step, record.cond, latents)
        return with_prediction(record.cond_output, value)

    @torch.compiler.disable
    def _resolve_uncond(self, state: GuidanceState, ctx, args: tuple, kwargs: dict, latents) -> str:
        """The action for an "uncond" call, once it is sure the skip can be served."""
        action = self._plan(state, ctx, latents)
        if action == COMPUTE:
            return action
        record = state.record(ctx.step_index)
        if record.cond is None:  # this pipeline calls "uncond" first: compute the conditional here
            return action if self._precompute_cond(state, ctx.step_index, args, kwargs) else COMPUTE
        if not same_tensor(record.latents, latents):
            self._warn(state, "latents", "the unconditional call got other latents than the conditional "
                       "one; evaluating it instead of skipping")
            return COMPUTE
        self.runtime.narrow_forward(())  # the denoiser does not run at all
        return action

    # ------------------------------------------------------------------ doubled batch

    def _doubled_call(self, ctx, args: tuple, kwargs: dict):
        state: GuidanceState = self.states.get(STATE_KEY)
        step = ctx.step_index
        given = get_argument(args, kwargs, self.hidden_arg, self.hidden_position)
        listed = is_tensor_list(given)  # per-image latents (Z-Image): stacked here
        hidden = torch.stack(list(given)) if listed else given
        full = hidden.shape[0]
        at = self.cond_half  # diffusers' order [uncond, cond]: 1; Z-Image's [cond, uncond]: 0
        latents = hidden[full // 2 * at : full // 2 * (at + 1)]
        action = self._plan(state, ctx, latents)
        if action == COMPUTE:
            output = self.fn_ref.original_forward(*args, **kwargs)
            halves = prediction_of(output).chunk(2)
            cond, uncond = halves[at], halves[1 - at]
            self._record_pair(state, step, latents, cond, output, uncond, real=True)
            return output
        self.runtime.narrow_forward((COND,))
        half_args, half_kwargs = cond_half_arguments(args, kwargs, full, self.positional_names, which=at,
                                                     per_sample_lists=listed)
        output = self.fn_ref.original_forward(*half_args, **half_kwargs)
        cond = prediction_of(output)
        self._record_pair(state, step, latents, cond, output, None, real=False)
        value = self._skipped_value(state, action, step, cond, latents)
        doubled = with_prediction(output, torch.cat([value, cond] if at == 1 else [cond, value]))
        # Further predictions (LTX-2's audio) take the conditional one in both halves: unguided on this step.
        half = full // 2
        return with_other_outputs(doubled, lambda x: torch.cat([x, x]) if x.dim() and x.shape[0] == half else x)

    # ------------------------------------------------------------------ decisions and bookkeeping

    @torch.compiler.disable
    def _plan(self, state: GuidanceState, ctx, latents: torch.Tensor | None) -> str:
        config = self.config
        state.record(ctx.step_index)
        if config.mode == "interval" and ctx.num_steps is None:
            self._warn(state, "steps", "guidance='interval' needs the call's number of steps, which the "
                       "scheduler did not give; evaluating every step with guidance")
        if config.final_steps and ctx.num_steps is None:
            self._warn(state, "steps", f"final_steps={config.final_steps} needs the call's number of steps, "
                       "which the scheduler did not give; the last steps follow the truncation like the others")
        return uncond_action(
            config.mode,
            ctx.step_index,
            ctx.num_steps,
            min_steps=config.min_steps,
            truncated=state.truncated or config.threshold <= -1.0,
            refresh_every=config.refresh_every,
            interval=config.interval,
            can_estimate=state.history_for(ctx.step_index, latents) is not None,
            final_steps=config.final_steps,
        )

    @torch.compiler.disable
    def _skipped_value(self, state: GuidanceState, action: str, step: int, cond: torch.Tensor, latents) -> torch.Tensor:
        """The unconditional prediction used in place of the skipped one, and the counts."""
        self.runtime.count(SKIPPED)
        if action == DROP:
            value = cond
        else:
            prev = state.history_for(step, latents)
            value = linear_ag_estimate(self._row(state, step), cond, prev.cond, prev.uncond, latents)
            self.runtime.count(ESTIMATED)
        record = state.record(step)
        record.uncond, record.uncond_real = value, False
        return value

    def _row(self, state: GuidanceState, step: int) -> tuple[float, ...]:
        rows = self.config.coefficients
        if not rows:
            return CARRY_GUIDANCE
        num_steps = self.runtime.clock.num_steps
        if num_steps != len(rows):
            self._warn(state, "rows", f"LinearAG coefficients were fitted for {len(rows)} steps but this call has "
                       f"{num_steps}; estimating with the training-free (1, -1, 1, 0) instead. Refit with "
                       f"`diffaccel tune guidance --steps {num_steps}`")
            return CARRY_GUIDANCE
        return rows[step]

    @torch.compiler.disable
    def _after_cond(self, state: GuidanceState, step: int, args: tuple, kwargs: dict, output: Any) -> None:
        state.cond_call = (args, kwargs)
        latents = self._latents(args, kwargs)
        self._record_pair(state, step, latents, latent_prediction(prediction_of(output), latents), output, None,
                          real=False)

    @torch.compiler.disable
    def _after_uncond(self, state: GuidanceState, step: int, latents, uncond: torch.Tensor) -> None:
        record = state.record(step)
        self._record_pair(state, step, record.latents if record.latents is not None else latents,
                          record.cond, record.cond_output, uncond, real=True)

    @torch.compiler.disable
    def _record_pair(self, state, step, latents, cond, cond_output, uncond, real: bool) -> None:
        record = state.record(step)
        record.latents = latents
        if cond is not None:
            record.cond, record.cond_output = cond, cond_output
        if uncond is not None:
            record.uncond, record.uncond_real = uncond, real
        if record.cond is None or record.uncond is None or not record.uncond_real or record.measured:
            return
        record.measured = True
        for observer in self.observers:
            observer(step, record.latents, record.cond, record.uncond)
        if self.config.mode == "interval" or (state.truncated and not self.observers):
            return
        similarity = cosine_similarity(record.cond, record.uncond)
        state.similarities[step] = similarity
        if not state.truncated and crosses(similarity, self.config.threshold):
            state.truncated, state.truncated_at = True, step
            logger.debug("diffaccel: guidance truncated at step %d (cosine similarity %.5f)", step, similarity)

    # ------------------------------------------------------------------ "uncond" called before "cond"

    @torch.compiler.disable
    def _precompute_cond(self, state: GuidanceState, step: int, args: tuple, kwargs: dict) -> bool:
        """Compute this step's conditional prediction during the "uncond" call, from the last conditional
        call's arguments with this step's latents and timestep. False if that is not possible."""
        if state.cond_call is None or not state.precompute_ok:
            self._warn(state, "order", "this pipeline calls the unconditional branch first and no conditional "
                       "call is known yet; evaluating it instead of skipping")
            return False
        cond_args, cond_kwargs = state.cond_call
        for name, position in ((self.hidden_arg, self.hidden_position), (self.timestep_arg, self.timestep_position)):
            value = get_argument(args, kwargs, name, position)
            cond_args, cond_kwargs = set_argument(cond_args, cond_kwargs, name, position, value)
        self.runtime.narrow_forward((COND,))  # this forward now evaluates the conditional branch
        output = self.fn_ref.original_forward(*cond_args, **cond_kwargs)
        state.precomputed = (step, output, cond_args, cond_kwargs)
        self._after_cond(state, step, cond_args, cond_kwargs, output)
        return True

    @torch.compiler.disable
    def _take_precomputed(self, state: GuidanceState, step: int, args: tuple, kwargs: dict) -> Any:
        if state.precomputed is None or state.precomputed[0] != step:
            return None
        _, output, used_args, used_kwargs = state.precomputed
        state.precomputed = None
        if same_arguments(used_args, used_kwargs, args, kwargs):
            self.runtime.narrow_forward(())  # computed during the "uncond" call already
            return output
        state.precompute_ok = False
        self._warn(state, "precompute", "the conditional call's arguments changed between steps, so the "
                   "conditional prediction computed early is not reused; no longer skipping an unconditional "
                   "call that comes first in this call")
        return None

    # ------------------------------------------------------------------ helpers

    def _note_no_cfg(self, state: GuidanceState, step: int) -> None:
        """A step that ended without an unconditional call: this call runs no CFG (guidance 1, or a
        guidance-distilled model such as MiniMax H3), so there is nothing to skip. Said once, not silently."""
        prev = state.current
        if prev is not None and prev.step == step - 1 and prev.cond is not None and prev.uncond is None:
            self._warn(state, "no_cfg", f"{self.config.method} guidance has nothing to skip in this call: step "
                       f"{step - 1} ran no unconditional branch (guidance is off, or the model is guidance-distilled)")

    def _latents(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The latent input, stacked where the denoiser takes a list of per-image latents (Z-Image)."""
        latents = get_argument(args, kwargs, self.hidden_arg, self.hidden_position)
        return torch.stack(list(latents)) if is_tensor_list(latents) else latents

    def _warn(self, state: GuidanceState, key: str, message: str) -> None:
        if key not in state.warned:
            state.warned.add(key)
            logger.warning("diffaccel: %s.", message)


# ------------------------------------------------------------------------------------------ handler


class AdaptiveGuidanceHandler:
    def validate(self, config: AdaptiveGuidanceConfig, target: AccelTarget) -> None:
        """Both CFG layouts are handled, and the adapter row (checked against the forward signature when
        registered) names the latent argument a doubled batch is cut by and the order of its halves."""

    def apply(self, config: AdaptiveGuidanceConfig, target: AccelTarget, runtime) -> None:
        states = runtime.new_branch_states(GuidanceState)
        runtime.register_hook(target.denoiser, AdaptiveGuidanceHook(config, runtime, states, target.denoiser), GUIDANCE_HOOK)


for _config_cls in (AdaptiveGuidanceConfig, LinearGuidanceConfig, IntervalGuidanceConfig):
    register_method(_config_cls)(AdaptiveGuidanceHandler)
