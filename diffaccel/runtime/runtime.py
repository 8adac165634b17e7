"""The step runtime: one per accelerated pipeline (and one more per expert denoiser, e.g. Wan 2.2's
``transformer_2``, held and driven by the main one).

It owns the step clock, the per-branch method states and the statistics, and it installs (and on
``remove`` takes away) every hook through diffusers' ``HookRegistry``. Two taps feed the clock:

* the scheduler's ``set_timesteps`` (a new pipeline call: all state is dropped) and ``step`` (a
  denoising step ended), wrapped on the scheduler *instance* — no class is touched;
* a ``ModelHook`` on the denoiser, outermost in its hook chain, that turns each forward into a
  ``StepContext``: CFG branch (diffusers' ``cache_context`` name, or a doubled batch detected from
  its identical latent halves), timestep, token grid. A change of grid or batch inside a call drops
  that branch's state, so a resolution change can never feed a stale cache.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import weakref
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from diffaccel.pipelines.adapters import (FamilyAdapter, argument_position, get_argument, is_tensor_list,
                                         set_latent_tokens, token_grid)

from .context import COND, COND_UNCOND, DEFAULT, GUIDER_BRANCHES, UNCOND, StepClock, StepContext
from .state import BranchStates, RunStats

logger = logging.getLogger("diffaccel")

RUNTIME_HOOK = "diffaccel.runtime"
PIPE_ATTRIBUTE = "_diffaccel_runtime"


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` out of ``module``'s diffusers ``HookRegistry``, keeping any forward wrapper that
    was installed on top of it since.

    When the hook is the registry's outermost, the registry resets ``module.forward`` to what the hook
    wrapped, which would also drop a wrapper added afterwards: accelerate's device hooks
    (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``device_map`` dispatch), which move
    the module's own weights in for each forward. Such a wrapper is put back around what the registry
    leaves, so offloading applied after ``accelerate`` survives ``remove``.
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return
    outer = module.forward
    # accelerate's wrapper calls ``module._old_forward``, the forward it found, and says so in __wrapped__
    # (functools.update_wrapper); a wrapper underneath our hooks wraps the original forward instead.
    accelerate_on_top = (getattr(module, "_hf_hook", None) is not None
                         and getattr(outer, "__wrapped__", None) is getattr(module, "_old_forward", None))
    registry.remove_hook(name, recurse=False)
    if accelerate_on_top and module.forward is not outer:
        module._old_forward = outer.__wrapped__ = module.forward  # the next removal recognises it again
        module.forward = outer


def _pass_auxiliary_forwards(hook: ModelHook, runtime: "Runtime") -> None:
    """Make ``hook`` (before it is registered) leave a forward untouched while ``runtime.auxiliary`` is set."""
    pre_forward, post_forward = hook.pre_forward, hook.post_forward

    def pre(module, *args, **kwargs):
        return (args, kwargs) if runtime.auxiliary else pre_forward(module, *args, **kwargs)

    def post(module, output):
        return output if runtime.auxiliary else post_forward(module, output)

    hook.pre_forward, hook.post_forward = pre, post
    if hasattr(hook, "new_forward"):
        new_forward = hook.new_forward

        def new(module, *args, **kwargs):
            if runtime.auxiliary:
                return hook.fn_ref.original_forward(*args, **kwargs)
            return new_forward(module, *args, **kwargs)

        hook.new_forward = new


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class BranchTracker(StateManager):
    """Receives the name a pipeline gives with ``transformer.cache_context(name)``.

    diffusers hands the context to every ``StateManager`` found on a stateful hook; pipelines that
    open no context (PixArt, SD3, Sana, SD) simply leave it unset.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name


class DenoiserHook(ModelHook):
    """Outermost hook on the denoiser: describes each forward to the runtime."""

    _is_stateful = True

    def __init__(self, runtime: "Runtime") -> None:
        super().__init__()
        self.runtime = runtime
        self.branch_tracker = BranchTracker()

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        runtime.auxiliary = runtime.is_auxiliary(kwargs)
        if runtime.auxiliary:  # not a denoising step: every method hook below passes it through
            (runtime.primary or runtime)._start_announced_call()
            runtime.count("auxiliary_forwards")
            return args, kwargs
        runtime.begin_forward(args, kwargs, self.branch_tracker.name)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        self.runtime.auxiliary = False
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.reset_states()
        return module


def latent_grid(hidden: torch.Tensor, layout: str) -> tuple[int, ...]:
    """The token grid of the latent input: (frames, height, width), (height, width) or (tokens,)."""
    if layout == "CFHW_LIST":
        return tuple(hidden[0].shape[1:]) if len(hidden) else ()
    shape = tuple(hidden.shape)
    if layout == "BCHW":
        return shape[2:4]
    if layout == "BCFHW":
        return shape[2:5]
    if layout == "BFCHW":
        return (shape[1],) + shape[3:5]
    if layout == "BFHWC":  # channels last (Kandinsky 5)
        return shape[1:4]
    return shape[1:2]  # BSC: packed tokens


def joins_text(adapter: FamilyAdapter, denoiser: torch.nn.Module) -> bool:
    """Whether any of the denoiser's blocks takes [text, latent] joined (``BlockSpec.joined_text``)."""
    try:
        return any(block.spec.joined_text for block in adapter.find_blocks(denoiser))
    except ValueError:  # undescribed blocks (UNets): the methods that need specs refuse them themselves
        return False


class Runtime:
    """Clock, states, stats and installed hooks of one accelerated denoiser; the pipeline's main runtime also
    taps the scheduler and drives and reports its experts'."""

    def __init__(self, pipe: Any, denoiser: torch.nn.Module, adapter: FamilyAdapter, config: Any,
                 primary: "Runtime | None" = None, branch: str | None = None) -> None:
        try:
            self._pipe_ref = weakref.ref(pipe)
        except TypeError:  # objects without weakref support (plain namespaces)
            self._pipe_ref = lambda: pipe
        self.denoiser = denoiser
        self.adapter = adapter
        self.config = config
        self.clock = StepClock()
        # Set by context parallel: cache decisions are all-reduced over this process group, so that
        # ranks holding different shards of the sequence never disagree on skipping a block.
        self.decision_group = None
        self.blocks_per_forward = adapter.count_blocks(denoiser)
        self.call_stats = RunStats(blocks_per_forward=self.blocks_per_forward)
        self.total_stats = RunStats(blocks_per_forward=self.blocks_per_forward)
        self._states: list[BranchStates] = []
        self._signatures: dict[str, tuple] = {}
        self._installed: list[tuple[torch.nn.Module, str]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._scheduler = None
        self._scheduler_originals: dict[str, Any] = {}
        self._scheduler_own: dict[str, Any] = {}
        self._hooked_forwards, self._warned_bypass = 0, False  # forwards through DenoiserHook this step
        self._announced: tuple[int | None] | None = None  # a call set_timesteps announced, not started yet
        # A pipeline with experts (Wan 2.2's transformer_2) has one runtime per denoiser: the main one (primary
        # None) holds the others in ``experts``, counts every runtime's forwards per step and reports for all.
        self.primary = primary
        self.experts: dict[str, Runtime] = {}
        # The one CFG branch every forward of this denoiser computes, where the pipeline gives each branch a model
        # of its own (Ideogram 4's unconditional_transformer); None: told by contexts, batch or call order.
        self.branch = branch
        self.auxiliary = False  # set by the denoiser hook during an auxiliary forward (FamilyAdapter.auxiliary_forward)
        self.name = "denoiser"  # the pipeline attribute that holds it, where the caller knows (api._install)
        self._hidden_position = argument_position(denoiser, adapter.hidden_arg)
        self._timestep_position = argument_position(denoiser, adapter.timestep_arg)
        self._joins_text = joins_text(adapter, denoiser)  # only then does a forward record its latent tokens

    # ----------------------------------------------------------------------------- installation

    @property
    def pipe(self) -> Any:
        return self._pipe_ref()

    def register_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register a hook through diffusers' registry and remember it for ``remove``. Where the family has
        auxiliary forwards, a method's hook passes them through."""
        if self.adapter.auxiliary_forward and not isinstance(hook, DenoiserHook):
            _pass_auxiliary_forwards(hook, self)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name))

    def is_auxiliary(self, kwargs: dict) -> bool:
        """Whether a forward is the family's auxiliary pass (``FamilyAdapter.auxiliary_forward``)."""
        rule = self.adapter.auxiliary_forward
        return bool(rule) and kwargs.get(rule[0]) == rule[1]

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Something ``remove`` must undo that is not a hook (e.g. an attention processor)."""
        self._cleanups.append(fn)

    def new_branch_states(self, factory: Callable[[], Any]) -> BranchStates:
        """Per-branch state for a method; dropped at every call start and on shape changes."""
        states = BranchStates(factory)
        self._states.append(states)
        return states

    def install_denoiser_hook(self) -> None:
        """Install last, so it runs first: every method hook below it sees a fresh context."""
        self.register_hook(self.denoiser, DenoiserHook(self), RUNTIME_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.denoiser).invalidate_child_registries_cache()
        if self.primary is None:  # an expert's clock is driven by the main runtime's taps
            self._tap_scheduler()

    def add_expert(self, name: str, runtime: "Runtime") -> None:
        """Another denoiser of this pipeline (attribute ``name``), accelerated by ``runtime``: it follows this
        runtime's calls and steps (one scheduler tap per pipeline) and is removed with it."""
        runtime.name = name
        self.experts[name] = runtime

    def remove(self) -> None:
        """Take away every hook, scheduler tap and processor this runtime (and its experts') installed."""
        for expert in reversed(list(self.experts.values())):  # installed after this one: off first
            expert.remove()
        self.experts.clear()
        for module, name in reversed(self._installed):
            remove_hook(module, name)
        self._installed.clear()
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()
        self._untap_scheduler()
        set_latent_tokens(self.denoiser, None)
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()
        self.reset_states()

    # ----------------------------------------------------------------------------- scheduler taps

    def _tap_scheduler(self) -> None:
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is None:
            return
        originals = {"set_timesteps": scheduler.set_timesteps, "step": scheduler.step}
        # Instance attributes someone set before us (a user's own wrapper) come back on remove.
        self._scheduler_own = {name: vars(scheduler)[name] for name in originals if name in vars(scheduler)}

        def set_timesteps(*args, **kwargs):
            result = originals["set_timesteps"](*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            self.announce_call(len(timesteps) if timesteps is not None else None)
            return result

        def step(*args, **kwargs):
            result = originals["step"](*args, **kwargs)
            self.end_step()
            return result

        def deepcopy_untapped(memo):
            """A deep copy of the tapped scheduler is an untapped one (LTX-2 copies its scheduler for the audio
            latents): copied taps would step this scheduler again and count its steps as the call's."""
            state = vars(scheduler)
            tapped = {name: state.pop(name) for name in (*originals, "__deepcopy__") if name in state}
            state.update(self._scheduler_own)
            try:
                duplicate = copy.deepcopy(scheduler, memo)
                # A wrapper installed over the taps that belongs to the call, not to this scheduler (the
                # bottleneck's stage schedule), follows the copy: LTX-2's audio scheduler runs the same ramp.
                for name, wrapper in tapped.items():
                    follow = getattr(wrapper, "for_copy", None)
                    if follow is not None:
                        setattr(duplicate, name, follow(duplicate))
                return duplicate
            finally:
                for name in self._scheduler_own:
                    state.pop(name, None)
                state.update(tapped)

        # update_wrapper keeps the signature visible: pipelines inspect set_timesteps' parameters.
        scheduler.set_timesteps = functools.update_wrapper(set_timesteps, originals["set_timesteps"])
        scheduler.step = functools.update_wrapper(step, originals["step"])
        scheduler.__deepcopy__ = deepcopy_untapped
        self._scheduler = scheduler
        self._scheduler_originals = originals

    def _untap_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None:
            for name in (*self._scheduler_originals, "__deepcopy__"):
                if name in vars(scheduler):
                    delattr(scheduler, name)
                if name in self._scheduler_own:
                    setattr(scheduler, name, self._scheduler_own[name])
        self._scheduler = None
        self._scheduler_originals = {}
        self._scheduler_own = {}

    def _follow_scheduler(self) -> None:
        """The user may swap ``pipe.scheduler`` after accelerate(): tap the new one."""
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is self._scheduler:
            return
        self._untap_scheduler()
        self._tap_scheduler()
        # This call's set_timesteps went to the untapped scheduler: start the call here.
        timesteps = getattr(scheduler, "timesteps", None)
        logger.info("diffaccel: pipe.scheduler was replaced; following the new %s", type(scheduler).__name__)
        self.start_call(len(timesteps) if timesteps is not None else None)

    # ----------------------------------------------------------------------------- clock events

    def announce_call(self, num_steps: int | None) -> None:
        """The scheduler was set for a call of ``num_steps``: the call starts at its first forward or step. A
        pipeline that sets its scheduler again after its last loop (Wan Animate, after every segment) so leaves
        the finished call's statistics in place, and a new call still starts from clean state."""
        self._announced = (num_steps,)

    def _start_announced_call(self) -> None:
        if self._announced is not None:
            (num_steps,), self._announced = self._announced, None
            self.start_call(num_steps)

    def start_call(self, num_steps: int | None) -> None:
        self._announced = None
        self.reset_states()
        self._signatures.clear()
        self.call_stats = RunStats(calls=1, blocks_per_forward=self.blocks_per_forward)
        self.total_stats.calls += 1
        self.clock.begin_call(num_steps)
        self._hooked_forwards, self._warned_bypass = 0, False
        for expert in self.experts.values():
            expert.start_call(num_steps)

    def end_step(self) -> None:
        if self.primary is None:  # the main runtime watches for steps that no accelerated denoiser ran
            self._start_announced_call()
            self._check_step_was_hooked()
        self.clock.end_step()
        self.call_stats.steps += 1
        self.total_stats.steps += 1
        for expert in self.experts.values():
            expert.end_step()

    def _check_step_was_hooked(self) -> None:
        if self._hooked_forwards == 0 and not self._warned_bypass:
            self._warned_bypass = True  # once per call
            models = " or ".join(type(r.denoiser).__name__ for r in (self, *self.experts.values()))
            logger.warning(
                "diffaccel: a denoising step of %s ended without any forward of the accelerated %s through "
                "diffaccel's hook, so this call is not (fully) accelerated. Either the step ran a model diffaccel "
                "did not find on the pipeline (it accelerates pipe.transformer or pipe.unet, and "
                "pipe.transformer_2), or the denoiser's forward was replaced after diffaccel.accelerate (e.g. "
                "offloading applied a second time: call diffaccel.remove(pipe) before changing the offloading, "
                "then accelerate again).",
                type(self.pipe).__name__, models)
        self._hooked_forwards = 0

    def reset_states(self, branch: str | None = None) -> None:
        for states in self._states:
            states.reset(branch)

    @torch.compiler.disable
    def begin_forward(self, args: tuple, kwargs: dict, context_name: str | None) -> StepContext:
        main = self.primary or self
        main._follow_scheduler()
        main._start_announced_call()
        if not self.clock.in_call:
            main.start_call(None)  # the denoiser is driven by something other than a pipeline call
        main._hooked_forwards += 1
        hidden = get_argument(args, kwargs, self.adapter.hidden_arg, self._hidden_position)
        timestep = get_argument(args, kwargs, self.adapter.timestep_arg, self._timestep_position)
        if not isinstance(hidden, torch.Tensor) and not (self.adapter.latent_layout == "CFHW_LIST"
                                                         and is_tensor_list(hidden)):
            raise ValueError(
                f"diffaccel: {type(self.denoiser).__name__} was called without a tensor "
                f"'{self.adapter.hidden_arg}' argument; cannot track the denoising step."
            )
        if isinstance(timestep, torch.Tensor):
            timestep_value = float(timestep.reshape(-1)[0]) if timestep.numel() else None
        elif isinstance(timestep, (int, float)):
            timestep_value = float(timestep)
        else:
            timestep_value = None

        context_name = GUIDER_BRANCHES.get(context_name, context_name)
        forward_in_step = self.clock.forwards_in_step
        self.clock.forwards_in_step += 1
        if self.branch is not None:
            branch, branches = self.branch, (self.branch,)
        elif context_name in (COND, UNCOND):
            branch, branches = context_name, (context_name,)
        elif self.adapter.cfg_layout == "batched" and self._is_doubled_cfg_batch(hidden):
            branch, branches = COND_UNCOND, self.adapter.cfg_batch_order
        elif context_name is None and (ordered := self._branch_by_call_order(forward_in_step)) is not None:
            branch, branches = ordered, (ordered,)
        else:
            branch = context_name if context_name not in (None, COND_UNCOND) else DEFAULT
            branches = (COND,)

        batch_size = len(hidden)
        grid = latent_grid(hidden, self.adapter.latent_layout)
        if self._joins_text:
            set_latent_tokens(self.denoiser, self._latent_tokens(hidden, grid, kwargs))
        self._check_signature(branch, (grid, batch_size))

        for stats in (self.call_stats, self.total_stats):
            stats.denoiser_forwards += 1
            stats.denoiser_calls_by_branch.update(branches)
        return self.clock.make_context(
            timestep=timestep_value, branch=branch, branches_in_batch=branches, grid=grid, batch_size=batch_size
        )

    def _latent_tokens(self, hidden: torch.Tensor, grid: tuple[int, ...], kwargs: dict) -> int:
        """Where joined_text blocks split their sequence: the packed tokens' count, or the patchified latent
        grid's (AuraFlow joins [text, image] over BCHW latents), or the count non-square latents are padded to
        (HiDream-I1's max_seq)."""
        if self.adapter.latent_layout == "BSC":
            return hidden.shape[1]
        if self.adapter.padded_latent_tokens and len(grid) >= 2 and grid[-1] != grid[-2]:
            return int(getattr(self.denoiser, self.adapter.padded_latent_tokens))
        return math.prod(token_grid(self.adapter, self.denoiser, grid, kwargs))

    def _branch_by_call_order(self, forward_in_step: int) -> str | None:
        """The branch of a forward that opened no cache context and is not a doubled CFG batch, in a pipeline
        that runs its CFG branches as separate calls (a per-branch family, e.g. Chroma or Lumina 2, or any
        pipeline guiding through a diffusers guider, e.g. the modular Z-Image one): within a step the first
        call is the conditional one and the second the unconditional one, the order of every diffusers
        pipeline. None where that does not apply: a batched family's pipeline without a guider, a forward
        outside a scheduler-driven call, a third call in one step."""
        if self.clock.num_steps is None or forward_in_step > 1:
            return None
        if self.adapter.cfg_layout != "separate" and getattr(self.pipe, "guider", None) is None:
            return None
        return (COND, UNCOND)[forward_in_step]

    def _check_signature(self, branch: str, signature: tuple) -> None:
        """A change of grid or batch inside a call drops that branch's state."""
        previous = self._signatures.get(branch)
        if previous is not None and previous != signature:
            logger.info(
                "diffaccel: latent shape changed within a call (%s -> %s); dropping the %r branch state",
                previous,
                signature,
                branch,
            )
            self.reset_states(branch)
            self.call_stats.state_resets += 1
            self.total_stats.state_resets += 1
        self._signatures[branch] = signature

    @torch.compiler.disable
    def narrow_forward(self, branches: tuple[str, ...]) -> StepContext:
        """A method changed which CFG branches the forward now running evaluates.

        Adaptive guidance calls it when it skips the unconditional branch: with ``()`` when it returns
        without running the denoiser (a skipped per-branch call), with ``("cond",)`` when only the
        conditional half of a doubled batch runs. The statistics then count what really ran, and the
        context handed to the hooks below describes that forward (its branch key and batch size), so the
        state of a branch that is not evaluated is never touched. Returns the (new) current context.
        """
        ctx = self.clock.current
        for stats in (self.call_stats, self.total_stats):
            counted = stats.denoiser_calls_by_branch
            counted.subtract(ctx.branches_in_batch)
            counted.update(branches)
            for name in [name for name, count in counted.items() if count <= 0]:
                del counted[name]
            if not branches:
                stats.denoiser_forwards -= 1
        if not branches:
            return ctx
        if len(branches) == 1:
            branch = branches[0]
        elif set(branches) == {COND, UNCOND}:
            branch = COND_UNCOND
        else:
            raise ValueError(f"narrow_forward: unsupported branches {branches!r}.")
        batch_size = ctx.batch_size // len(ctx.branches_in_batch) * len(branches)
        self._check_signature(branch, (ctx.grid, batch_size))
        self.clock.current = dataclasses.replace(
            ctx, branch=branch, branches_in_batch=tuple(branches), batch_size=batch_size
        )
        return self.clock.current

    def _is_doubled_cfg_batch(self, hidden: torch.Tensor | list[torch.Tensor]) -> bool:
        """A CFG batch is ``cat([latents] * 2)``: an even batch whose halves are identical."""
        batch = len(hidden)
        if batch % 2:
            return False
        try:
            flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        except Exception:  # a property reading a field the pipeline has not set yet
            flag = None
        if flag is False:
            return False
        half = batch // 2
        if is_tensor_list(hidden):  # per-image latents (CFHW_LIST)
            return all(torch.equal(a, b) for a, b in zip(hidden[:half], hidden[half:]))
        return bool(torch.equal(hidden[:half], hidden[half:]))

    # ----------------------------------------------------------------------------- reporting

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a method-specific counter in the call and total statistics."""
        self.call_stats.counters[name] += amount
        self.total_stats.counters[name] += amount

    def count_skipped_blocks(self, amount: int = 1) -> None:
        self.call_stats.blocks_skipped += amount
        self.total_stats.blocks_skipped += amount

    def add_call_to(self, totals: list[RunStats] | None) -> list[RunStats]:
        """Sum the call just ended into ``totals`` (None: start them), one entry for this runtime and one per
        expert: a method that runs one pipeline call as several (the bottleneck's stages) reports them as one."""
        calls = [self.call_stats, *(expert.call_stats for expert in self.experts.values())]
        if totals is None:
            return calls
        for total, call in zip(totals, calls):
            total.add(call)
            total.calls = 1
        return totals

    def set_call_stats(self, totals: list[RunStats]) -> None:
        """Report ``totals`` (from ``add_call_to``) as this call's statistics."""
        for runtime, total in zip([self, *self.experts.values()], totals):
            runtime.call_stats = total

    def stats(self, cumulative: bool = False) -> dict:
        """This runtime's statistics; with experts, every denoiser's forwards, blocks and counters summed over
        the call's steps, and each one's own under ``models``."""
        own = self.total_stats if cumulative else self.call_stats
        if not self.experts:
            data = own.as_dict()
        else:
            parts = {self.name: own} | {
                name: (r.total_stats if cumulative else r.call_stats) for name, r in self.experts.items()}
            data = RunStats.merged(own, list(parts.values())).as_dict()
            data["models"] = {name: part.as_dict(steps=False) for name, part in parts.items()}
        data["methods"] = [f"{m.slot}={m.method}" for m in self.config.methods()]
        return data

