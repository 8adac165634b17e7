"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv 2411.19108): skip the whole block stack while the first block's timestep-modulated input has
changed little since the last computed step.

Per forward, before any block runs: the indicator I is block 0's timestep-modulated input (its
adaptive ``norm1`` applied to the hidden stream with the timestep embedding; for blocks that modulate
inside their forward, e.g. Wan or PixArt, the timestep embedding itself, as TeaCache does for Wan).
The relative L1 change of I since the previous forward of the same CFG branch is passed through a
polynomial fitted per model (``calibrate_teacache``) and accumulated; while the sum stays below
``threshold`` the blocks are skipped and the block-stack residual (last block output minus first
block input, per stream) stored at the last computed step is added to the current input. A compute
resets the sum. The first ``warmup_steps`` steps and the last step always compute. With a calibrator
the replayed residual is forecast from the computed ones (TaylorSeer) rather than reused as stored:
TeaCache skips long runs of steps, where a stale residual is what costs fidelity. With
``reuse="output"`` a skipped forward replays (or forecasts) the denoiser's own output, the prediction,
instead of adding the residual to the fresh input: the quantity diffusers' TaylorSeer lite forecasts,
smoother along the steps than the hidden states that the output norm and projection still transform.

``indicator="sea"`` replaces block 0's modulated input by SeaCache's spectral-evolution-aware indicator
(arXiv 2602.18993): the denoiser's input latent, each channel filtered over its frame and pixel axes by
the Wiener gain of a clean signal with power 1/|f|^p seen through noise of level σ,
(1 − σ)·P / ((1 − σ)²·P + σ²) per axis, normalised to unit mean. Early, noisy steps weigh only the
coarse structure; late ones the detail, so the change reflects what the step will alter.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.hooks.hooks import ModelHook

from diffaccel.config import OMIT_WHEN_DEFAULT, MethodConfig, check_float, check_int, register_config
from diffaccel.guidance.layout import prediction_of, with_prediction
from diffaccel.pipelines.adapters import BoundBlock, argument_position, get_argument, is_tensor_list
from diffaccel.registry import AccelTarget, register_method

from .block_cache import SpanResidual, finished_span, relative_l1, stream_layout
from .calibrators import StreamForecast, check_calibrator

logger = logging.getLogger("diffaccel")

TEACACHE_HOOK = "diffaccel.teacache"
# Names under which blocks receive the timestep embedding (Flux/SD3/CogView4/Wan/Chroma/Lumina 2: temb;
# PixArt/Sana: timestep; FLUX.2 and Qwen-Image 2.1: the modulation vectors made from it; Z-Image: adaln_input;
# Kandinsky 5: time_embed; Bria FIBO 2: adaln_noisy, its adaln_input being None). ERNIE-Image hands its blocks
# a list of the modulation vectors, read as one.
TIMESTEP_EMBEDDING_ARGS = ("temb", "timestep_proj", "timestep", "emb", "time_emb", "temb_mod_img", "temb_mod",
                           "adaln_input", "modulation", "time_embed", "adaln_noisy")
TEACACHE_DENOISER_HOOK = "diffaccel.teacache.denoiser"
REUSE = ("residual", "output")
INDICATORS = ("modulated", "sea")
# Where the frame and pixel axes sit in each unpacked latent layout (packed token layouts have none).
SEA_AXES = {"BCHW": (2, 3), "BCFHW": (2, 3, 4), "BFCHW": (1, 3, 4), "BFHWC": (1, 2, 3)}


@register_config
@dataclass(frozen=True)
class TeaCacheConfig(MethodConfig):
    """Skip every block while the accumulated, rescaled change of the modulated input stays small.

    Args:
        threshold: δ; the accumulated rescaled relative-L1 change below which the blocks are skipped.
            0 never skips. Official values run 0.05-0.6 depending on the model and its polynomial.
        coefficients: the rescaling polynomial, highest degree first (numpy ``poly1d`` order), fitted
            per model by ``calibrate_teacache`` / ``diffaccel tune cache --method teacache``; empty uses
            the raw change (identity).
        expert_coefficients: for a pipeline with expert denoisers (Wan 2.2: ``transformer`` runs the
            high-noise steps, ``transformer_2`` the rest), the polynomial of each expert by its pipeline
            attribute, e.g. ``{"transformer_2": (...)}``; the main denoiser uses ``coefficients``, and so does an
            expert without an entry. Two experts are two models whose change-to-output relation differs, so
            each is fitted on its own steps (``calibrate_teacache_experts``). Naming an expert the pipeline
            does not have is an error.
        warmup_steps: first steps of each call that always compute (official: 1).
        force_last_step: the last step always computes (official: yes).
        max_consecutive: most skips in a row before a forced compute; None for no limit (official).
        calibrator: None replays the stored block-stack residual; "taylorseer" forecasts it along the
            step index from the computed steps' residuals.
        calibrator_order: order of the Taylor expansion, 1 or 2.
        reuse: what a skipped forward replays: "residual" (TeaCache's block-stack residual on the fresh
            input) or "output" (the denoiser's output, stored at the computed steps; forecast with the
            calibrator). The blocks are skipped either way.
        indicator: what the change is measured on: "modulated" (block 0's timestep-modulated input, as
            TeaCache) or "sea" (SeaCache's spectrally filtered input latent; images and unpacked video
            latents; its defaults: threshold 0.25, no polynomial, ``max_consecutive=2``, calibrator
            "taylorseer" of order 1).
        sea_power: p of the SEA filter's clean-signal power prior 1/|f|^p (SeaCache: 3 for video).
        schedule: a fixed plan in place of the indicator: one character per step, "1" computes, "0" skips
            (replays or forecasts what ``reuse`` names). Warm-up, last-step, threshold and
            ``max_consecutive`` rules then do not apply; a step with nothing stored yet computes. A call
            with another step count follows the nearest step's character. Made for a model by
            ``diffaccel.cache.tune.search_teacache_schedule`` / ``diffaccel tune cache --method schedule``.
    """

    slot = "cache"
    method = "teacache"

    threshold: float = 0.1
    coefficients: tuple[float, ...] = ()
    expert_coefficients: tuple[tuple[str, tuple[float, ...]], ...] = dataclasses.field(
        default=(), metadata={OMIT_WHEN_DEFAULT: True})
    warmup_steps: int = 1
    force_last_step: bool = True
    max_consecutive: int | None = None
    calibrator: str | None = None
    calibrator_order: int = 1
    reuse: str = "residual"
    indicator: str = "modulated"
    sea_power: float = 3.0
    schedule: str = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_float(name, "threshold", self.threshold, minimum=0.0)
        if self.reuse not in REUSE:
            raise ValueError(f"{name}.reuse must be one of {list(REUSE)}, got {self.reuse!r}.")
        if self.indicator not in INDICATORS:
            raise ValueError(f"{name}.indicator must be one of {list(INDICATORS)}, got {self.indicator!r}.")
        check_float(name, "sea_power", self.sea_power, minimum=0.0)
        check_calibrator(name, self.calibrator, self.calibrator_order)
        check_int(name, "warmup_steps", self.warmup_steps, minimum=0)
        if self.max_consecutive is not None:
            check_int(name, "max_consecutive", self.max_consecutive, minimum=1)
        if not isinstance(self.schedule, str) or set(self.schedule) - {"0", "1"}:
            raise ValueError(f"{name}.schedule must be a string of '1' (compute) and '0' (skip), one per step, "
                             f"got {self.schedule!r}.")
        if self.schedule and self.schedule[0] != "1":
            raise ValueError(f"{name}.schedule must compute its first step (nothing is stored before it), got "
                             f"{self.schedule!r}.")
        if not isinstance(self.force_last_step, bool):
            raise ValueError(f"{name}.force_last_step must be True or False, got {self.force_last_step!r}.")
        if not _finite_numbers(self.coefficients):
            raise ValueError(f"{name}.coefficients must be a tuple of finite numbers, got {self.coefficients!r}.")
        object.__setattr__(self, "expert_coefficients", _expert_polynomials(name, self.expert_coefficients))

    def expert_names(self) -> tuple[str, ...]:
        return tuple(expert for expert, _ in self.expert_coefficients)

    def for_expert(self, name: str) -> "TeaCacheConfig":
        """The expert's own polynomial in ``coefficients`` (the main one's where it has none)."""
        own = dict(self.expert_coefficients).get(name, self.coefficients)
        return dataclasses.replace(self, coefficients=own, expert_coefficients=())


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, tuple) and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in values)


def _expert_polynomials(owner: str, value: Any) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``expert_coefficients`` as sorted (name, polynomial) pairs, from a mapping or from pairs (a saved config)."""
    items = value.items() if isinstance(value, Mapping) else value
    problem = f"{owner}.expert_coefficients must map expert names (e.g. 'transformer_2') to tuples of finite numbers"
    try:
        pairs = [(expert, tuple(coefficients)) for expert, coefficients in items]
    except (TypeError, ValueError):
        raise ValueError(f"{problem}, got {value!r}.") from None
    names = [expert for expert, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{problem}; an expert is named twice in {value!r}.")
    for expert, coefficients in pairs:
        if not isinstance(expert, str) or not expert or not _finite_numbers(coefficients):
            raise ValueError(f"{problem}, got {expert!r}: {coefficients!r}.")
    return tuple(sorted(pairs))


def scheduled_compute(schedule: str, ctx) -> bool:
    """Whether ``schedule`` computes this step; a call of another length reads the nearest step's character."""
    n = len(schedule)
    total = ctx.num_steps or n
    index = ctx.step_index if total == n else round(ctx.step_index * (n - 1) / max(total - 1, 1))
    return schedule[min(max(index, 0), n - 1)] == "1"


def rescale(change: float, coefficients: Sequence[float]) -> float:
    """TeaCache's polynomial map from input change to estimated output change (identity if none)."""
    return float(np.polyval(coefficients, change)) if len(coefficients) else change


# Block classes whose norm1 does not take the timestep embedding the block receives (found on first use).
_INLINE_MODULATION: set[type] = set()


def _as_tensor(value) -> torch.Tensor | None:
    """A timestep embedding as one tensor: itself, or a list of modulation tensors joined on the last axis."""
    if isinstance(value, torch.Tensor):
        return value
    if is_tensor_list(value):
        return torch.cat([v.reshape(*v.shape[:-1], -1) for v in value], dim=-1)
    return None


def modulated_input(block: BoundBlock, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's timestep-modulated input, or its timestep embedding where the block modulates inline, or its
    hidden input where the block takes no timestep embedding (the model added the timestep to the tokens)."""
    signature = inspect.signature(inspect.unwrap(type(block.module).forward))
    bound = signature.bind_partial(None, *args, **kwargs).arguments
    temb = next((t for n in TIMESTEP_EMBEDDING_ARGS if (t := _as_tensor(bound.get(n))) is not None), None)
    if temb is None:  # the timestep reached the tokens before the blocks (Cosmos 3): they carry it themselves
        return block.stream_inputs(args, kwargs)[0]
    norm = getattr(block.module, "norm1", None)
    if norm is not None and type(block.module) not in _INLINE_MODULATION:
        params = list(inspect.signature(norm.forward).parameters)
        emb_name = next((n for n in ("emb", "temb") if n in params), None)
        if emb_name is not None:
            hidden, encoder = block.stream_inputs(args, kwargs)
            # what else the norm takes that the block received under the same name (Cosmos: embedded_timestep)
            extra = {n: bound[n] for n in params[1:] if isinstance(bound.get(n), torch.Tensor)}
            extra[emb_name] = temb
            if "encoder_hidden_states" in params:
                extra["encoder_hidden_states"] = encoder
            try:
                out = norm(hidden, **extra)
            except (RuntimeError, TypeError):
                # The block hands its norm a slice of the embedding it receives (Chroma: temb[:, :6]) or inputs
                # it does not receive itself, so it modulates inline as far as the indicator can see: the
                # embedding itself, as for Wan. Known from then on, so no later step tries (and fails) again.
                _INLINE_MODULATION.add(type(block.module))
                return temb
            return out[0] if isinstance(out, (tuple, list)) else out
    return temb


def sea_filter(latent: torch.Tensor, sigma: float, axes: Sequence[int], power: float) -> torch.Tensor:
    """SeaCache's indicator: ``latent`` filtered along ``axes`` by the per-axis Wiener gain of a clean
    signal with power 1/|f|^power under noise of level ``sigma``, the product normalised to unit mean."""
    x = latent.detach().float()
    sigma = min(max(float(sigma), 1e-6), 1.0 - 1e-6)
    signal, noise = 1.0 - sigma, sigma
    gain = torch.ones((), device=x.device)
    for axis in axes:
        freq = torch.fft.fftfreq(x.shape[axis], device=x.device).abs()
        prior = 1.0 / (freq.pow(power) + 1e-16)
        axis_gain = signal * prior / (signal**2 * prior + noise**2 + 1e-16)
        shape = [1] * x.ndim
        shape[axis] = -1
        gain = gain * axis_gain.reshape(shape)
    mean = gain.mean()
    if torch.isfinite(mean) and mean > 0:
        gain = gain / mean
    return torch.fft.ifftn(torch.fft.fftn(x, dim=tuple(axes)) * gain, dim=tuple(axes)).real


class TeaCacheState:
    """What one CFG branch remembers between forwards of a call."""

    def __init__(self, calibrator: str | None = None, order: int = 1) -> None:
        self.previous_indicator: torch.Tensor | None = None
        self.accumulated = 0.0
        self.skip = False
        self.consecutive_skips = 0
        self.stack: SpanResidual | None = None  # the stack's residual, summed while it computes
        self.hidden_residual: torch.Tensor | None = None
        self.encoder_residual: torch.Tensor | None = None
        self.encoder_output_is_none = False
        self.last_change: float | None = None  # raw relative change of this forward (calibration reads it)
        self.forecast = StreamForecast(calibrator, order)  # the stack residual, forecast when calibrated
        self.output: torch.Tensor | None = None  # reuse="output": the last computed prediction ...
        self.output_forecast = StreamForecast(calibrator, order)  # ... and its forecast
        self.sea_indicator: torch.Tensor | None = None  # indicator="sea": this forward's filtered input
        self.layout: tuple | None = None  # block 0's stream shapes at the last computed forward


class TeaCacheHook(ModelHook):
    """On every block: block 0 decides, all replay on a skip, the last one stores the stack residual."""

    _is_stateful = False

    def __init__(self, config: TeaCacheConfig, runtime, states, block: BoundBlock, first: bool, last: bool) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        self.block = block
        self.first = first
        self.last = last
        self.schedule_noted = False

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state: TeaCacheState = self.states.get(self.runtime.clock.current.branch)
        if self.first:
            self._decide(state, args, kwargs)
        if state.skip:
            return self._replay(state, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.config.reuse == "residual" and state.stack is not None:  # "output": the denoiser hook stores it
            state.stack.add(self.block, args, kwargs, output)
            if self.last:
                self._store(state)
        return output

    @torch.compiler.disable
    def _decide(self, state: TeaCacheState, args: tuple, kwargs: dict) -> None:
        ctx = self.runtime.clock.current
        config = self.config
        layout = stream_layout(*self.block.stream_inputs(args, kwargs))  # what was stored fits only this layout
        same_layout = state.layout == layout
        state.layout = layout  # kept by a skip, whose layout is equal; set by a compute
        if config.schedule:
            if ctx.num_steps not in (None, len(config.schedule)) and not self.schedule_noted:
                self.schedule_noted = True  # once per acceleration (one hook decides: block 0's)
                logger.info("diffaccel: TeaCache's schedule has %d steps and this call %d: each step follows the "
                            "nearest step's plan", len(config.schedule), ctx.num_steps)
            stored = state.output if config.reuse == "output" else state.hidden_residual
            self._settle(state, stored is not None and same_layout and not scheduled_compute(config.schedule, ctx),
                         args, kwargs)
            return
        if config.indicator == "sea":
            indicator = state.sea_indicator
        else:
            with torch.no_grad():
                indicator = modulated_input(self.block, args, kwargs).detach()
        previous = state.previous_indicator
        change = None
        if previous is not None and previous.shape == indicator.shape:
            change = relative_l1(indicator, previous, self.runtime.decision_group)
        state.previous_indicator = indicator
        state.last_change = change
        forced = (
            ctx.step_index < config.warmup_steps
            or (config.force_last_step and ctx.is_last_step)
            or change is None
            or not same_layout
            or (state.output if config.reuse == "output" else state.hidden_residual) is None
            or (config.max_consecutive is not None and state.consecutive_skips >= config.max_consecutive)
        )
        if not forced:
            state.accumulated += rescale(change, config.coefficients)
        self._settle(state, not forced and state.accumulated < config.threshold, args, kwargs)

    def _settle(self, state: TeaCacheState, skip: bool, args: tuple, kwargs: dict) -> None:
        """Record the decision for this forward (the blocks below read ``state.skip``) and count it."""
        state.skip = skip
        if skip:
            state.consecutive_skips += 1
            self.runtime.count("cache_hits")
        else:
            state.accumulated = 0.0
            state.consecutive_skips = 0
            if self.config.reuse == "residual":
                state.stack = SpanResidual()
            self.runtime.count("cache_misses")

    def _replay(self, state: TeaCacheState, args: tuple, kwargs: dict):
        hidden, encoder = self.block.stream_inputs(args, kwargs)
        if self.first and self.config.reuse == "residual":  # with "output" the denoiser's output is replaced
            step = self.runtime.clock.current.step_index
            hidden = hidden + state.forecast.hidden_at(state.hidden_residual, step)
            if encoder is not None and state.encoder_residual is not None:
                encoder = encoder + state.forecast.encoder_at(state.encoder_residual, step)
        if self.last and state.encoder_output_is_none:
            encoder = None
        self.runtime.count_skipped_blocks()
        return self.block.join_output(hidden, encoder)

    @torch.compiler.disable
    def _store(self, state: TeaCacheState) -> None:
        """The stack residual: what its blocks added (not what the model adds between them, e.g. ControlNet)."""
        stack, state.stack = state.stack, None
        done = finished_span(stack, state.forecast, self.runtime.clock.current.step_index)
        if done is not None:
            state.hidden_residual, state.encoder_residual, state.encoder_output_is_none = done


class TeaCacheDenoiserHook(ModelHook):
    """On the denoiser. ``indicator="sea"``: filters the input latent before block 0 decides.
    ``reuse="output"``: stores the prediction at the computed steps and puts the stored (or forecast)
    prediction in place of what a skipped forward computed from the untouched stack."""

    _is_stateful = False

    def __init__(self, config: TeaCacheConfig, runtime, states, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        self.hidden_arg = runtime.adapter.hidden_arg
        self.hidden_position = argument_position(denoiser, self.hidden_arg)
        self.axes = SEA_AXES.get(runtime.adapter.latent_layout)

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.config.indicator == "sea" and not self.config.schedule:  # a fixed schedule reads no indicator
            ctx = self.runtime.clock.current
            state: TeaCacheState = self.states.get(ctx.branch)
            latent = get_argument(args, kwargs, self.hidden_arg, self.hidden_position)
            state.sea_indicator = sea_filter(latent, self._sigma(ctx), self.axes, self.config.sea_power)
        return args, kwargs

    def _sigma(self, ctx) -> float:
        """The step's noise level: the scheduler's σ where it keeps them, else the timestep over 1000."""
        scheduler = getattr(self.runtime.pipe, "scheduler", None)
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and ctx.step_index < len(sigmas):
            return float(sigmas[ctx.step_index])
        return float(ctx.timestep) / 1000.0 if ctx.timestep is not None else 1.0

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.config.reuse != "output":
            return output
        state: TeaCacheState = self.states.get(self.runtime.clock.current.branch)
        step = self.runtime.clock.current.step_index
        if state.skip:
            return with_prediction(output, state.output_forecast.hidden_at(state.output, step))
        state.output = prediction_of(output)
        state.output_forecast.update(state.output, None, step)
        return output


@register_method(TeaCacheConfig)
class TeaCacheHandler:
    def validate(self, config: TeaCacheConfig, target: AccelTarget) -> None:
        if not target.adapter.block_cache:
            raise ValueError(
                f"cache='teacache' cannot apply to {target.denoiser_name}: {target.adapter.notes or 'no flat block list'}; "
                f"for UNets use cache='deep' (DeepCacheConfig)."
            )
        if config.indicator == "sea" and target.adapter.latent_layout not in SEA_AXES:
            raise ValueError(
                f"TeaCacheConfig(indicator='sea') cannot apply to {target.denoiser_name}: its latents come packed "
                f"into tokens ({target.adapter.latent_layout}), without the frame and pixel axes the SEA filter "
                f"works on; use indicator='modulated'."
            )
        if config.reuse == "output" and target.adapter.latent_layout == "CFHW_LIST":
            raise ValueError(
                f"TeaCacheConfig(reuse='output') cannot apply to {target.denoiser_name}: it returns a list of "
                f"per-image predictions, which this version does not replay; use reuse='residual'."
            )
        first = target.blocks[0].module
        params = inspect.signature(inspect.unwrap(type(first).forward)).parameters
        if config.indicator == "modulated" and not any(name in params for name in TIMESTEP_EMBEDDING_ARGS):
            logger.info(
                "diffaccel: TeaCache on %s: its first block (%s) takes no timestep embedding among %s (the model "
                "adds the timestep to the tokens before the blocks), so the change indicator is the block's hidden "
                "input itself.", target.denoiser_name, type(first).__name__, list(TIMESTEP_EMBEDDING_ARGS))

    def apply(self, config: TeaCacheConfig, target: AccelTarget, runtime) -> None:
        states = runtime.new_branch_states(lambda: TeaCacheState(config.calibrator, config.calibrator_order))
        blocks = target.blocks
        for index, block in enumerate(blocks):
            hook = TeaCacheHook(config, runtime, states, block, first=index == 0, last=index == len(blocks) - 1)
            runtime.register_hook(block.module, hook, TEACACHE_HOOK)
        if config.reuse == "output" or config.indicator == "sea":
            runtime.register_hook(target.denoiser, TeaCacheDenoiserHook(config, runtime, states, target.denoiser),
                                  TEACACHE_DENOISER_HOOK)


# ------------------------------------------------------------------------------------------ calibration


def calibrate_teacache(pipe: Any, runs: Sequence[dict], degree: int = 4) -> tuple[float, ...]:
    """Fit TeaCache's rescaling polynomial on baseline runs of ``pipe`` (TeaCache issue #2 recipe).

    ``runs`` are keyword arguments of ``pipe(...)`` (prompt, generator, steps, ...). Every step is
    computed; for consecutive forwards of each CFG branch the indicator's relative-L1 change is paired
    with the block-stack residual's, and ``np.polyfit(x, y, degree)`` maps one to the other. Returns
    the coefficients, highest degree first, for ``TeaCacheConfig(coefficients=...)``: the main denoiser's
    (a pipeline with experts: ``calibrate_teacache_experts``).
    """
    return calibrate_teacache_experts(pipe, runs, degree)[0]


def calibrate_teacache_experts(
    pipe: Any, runs: Sequence[dict], degree: int = 4
) -> tuple[tuple[float, ...], dict[str, tuple[float, ...]]]:
    """``calibrate_teacache`` for every denoiser of the pipeline, each on the steps it ran:
    ``(coefficients, expert_coefficients)`` for ``TeaCacheConfig`` (the second empty without experts).
    Wan 2.2's high-noise ``transformer`` and low-noise ``transformer_2`` are two models, so one polynomial
    fitted on both (or on the first alone) misjudges the other's changes."""
    import diffaccel

    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.0))  # never skips: computes the indicator
    main = diffaccel.api.runtime_of(pipe)
    collectors = {name: _ChangePairs(runtime) for name, runtime in {None: main, **main.experts}.items()}
    try:
        for kwargs in runs:
            for collector in collectors.values():
                collector.previous_residual.clear()
            pipe(**kwargs)
    finally:
        for collector in collectors.values():
            collector.close()
        diffaccel.remove(pipe)
    fitted = {name: collector.fit(degree) for name, collector in collectors.items()}
    return fitted.pop(None), fitted


class _ChangePairs:
    """(indicator change, block-stack residual change) of consecutive forwards of one denoiser per CFG
    branch, from hooks on its first and last block."""

    def __init__(self, runtime) -> None:
        self.runtime, self.name = runtime, runtime.name
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.previous_residual: dict[str, torch.Tensor] = {}
        self.states = runtime._states[-1]
        self.captured: dict[str, torch.Tensor] = {}
        blocks = runtime.adapter.find_blocks(runtime.denoiser)
        self.first, self.last = blocks[0], blocks[-1]
        self.handles = [
            self.first.module.register_forward_pre_hook(self._first_pre, with_kwargs=True),
            self.last.module.register_forward_hook(self._last_post, with_kwargs=True),
        ]

    def _first_pre(self, module, args, kwargs) -> None:
        self.captured["input"] = self.first.stream_inputs(args, kwargs)[0].detach()

    def _last_post(self, module, args, kwargs, output) -> None:
        ctx = self.runtime.clock.current
        residual = self.last.split_output(output)[0].detach() - self.captured.pop("input")
        change = self.states.get(ctx.branch).last_change
        before = None if ctx.step_index == 0 else self.previous_residual.get(ctx.branch)
        if change is not None and before is not None and before.shape == residual.shape:
            self.xs.append(change)
            self.ys.append(relative_l1(residual, before))
        self.previous_residual[ctx.branch] = residual

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def fit(self, degree: int) -> tuple[float, ...]:
        if len(self.xs) <= degree:
            raise ValueError(
                f"calibrate_teacache collected {len(self.xs)} step pairs for {self.name}, too few for a degree-"
                f"{degree} fit; use more runs or steps."
            )
        return tuple(float(c) for c in np.polyfit(np.asarray(self.xs), np.asarray(self.ys), degree))
