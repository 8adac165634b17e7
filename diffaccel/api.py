"""The public verbs: ``accelerate``, ``remove``, ``stats``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffaccel.pipelines.adapters import adapter_for, unwrap_denoiser

from .config import AccelConfig
from .presets import preset, preset_for
from .registry import AccelTarget, handler_for
from .runtime import PIPE_ATTRIBUTE, RUNTIME_HOOK, Runtime
from .runtime.context import UNCOND

logger = logging.getLogger("diffaccel")

DENOISER_ATTRIBUTES = ("transformer", "unet", "transformer_2")
# Further denoisers that run some of a call's forwards: Wan 2.2's low-noise expert (``transformer_2``, the steps
# below ``boundary_ratio``), Ideogram 4's unconditional model (``unconditional_transformer``, the unconditional
# branch of every step). Each is accelerated by a runtime of its own (its caches are its own), driven by the
# same steps; pipeline-level methods (sampling) apply once.
EXPERT_ATTRIBUTES = ("transformer_2", "unconditional_transformer")
# Experts that compute one CFG branch, every forward (the main denoiser then computes the other).
EXPERT_BRANCHES = {"unconditional_transformer": UNCOND}
# Slots whose method works on the pipeline call, not on one denoiser: installed once, by the main runtime.
PIPELINE_SLOTS = ("sampling",)
# Methods (by slot, or by slot and name) that cannot serve a pipeline with experts yet, with the reason.
NOT_WITH_EXPERTS = {
    ("sampling", "distilled"): "a student replaces one denoiser; the expert's steps would run the teacher at "
                               "the student's step count",
}
# And with one particular expert: (slot, method or None for any) -> why.
NOT_WITH_EXPERT = {
    "unconditional_transformer": {
        ("guidance", None): "the unconditional branch runs in a second model, and guidance methods compare or "
                            "replace the branches of one model",
        ("parallel", None): "CFG and context parallel shard one model's calls",
    },
}


def resolve_config(config: Any = None, unet: bool = False, pipe: Any = None, **slots: Any) -> AccelConfig:
    """Turn what ``accelerate`` accepts into an ``AccelConfig``.

    ``config`` may be None, a preset name, an ``AccelConfig``, a dict (``AccelConfig.to_dict`` form)
    or a path to a .json/.yaml file; ``slots`` (cache=, guidance=, ...) override it slot by slot.
    ``unet`` picks a preset's UNet recipe; with ``pipe``, a preset is this pipeline's (``preset_for``).
    """
    given = {slot: value for slot, value in slots.items() if value is not None}
    if config is None:
        base = AccelConfig()
    elif isinstance(config, AccelConfig):
        base = config
    elif isinstance(config, dict):
        base = AccelConfig.from_dict(config)
    elif isinstance(config, Path) or (isinstance(config, str) and config.endswith((".json", ".yaml", ".yml"))):
        base = AccelConfig.from_file(config)
    elif isinstance(config, str):
        base = preset(config, unet=unet) if pipe is None else preset_for(config, pipe, unet=unet, overridden=tuple(given))
    else:
        raise ValueError(
            f"accelerate() takes a preset name, an AccelConfig, a dict or a config file path, "
            f"got {type(config).__name__}."
        )
    return base.with_methods(**given) if given else base


def _validated(resolved: AccelConfig, target: AccelTarget) -> AccelConfig:
    """Check every method against this pipeline. One in a slot the config marks optional (a preset's) that
    cannot apply here is left out with a warning naming why; any other raises."""
    dropped = []
    for method in resolved.methods():
        try:
            handler_for(method).validate(method, target)
        except ValueError as error:
            if method.slot not in resolved.optional:
                raise
            logger.warning("diffaccel: running without %s=%s (optional in this config) on %s: %s", method.slot,
                           method.method, type(target.pipe).__name__, error)
            dropped.append(method.slot)
    return resolved.without(*dropped) if dropped else resolved


def find_denoiser(pipe: Any) -> torch.nn.Module:
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return unwrap_denoiser(module)
    raise ValueError(
        f"{type(pipe).__name__} has no denoiser: diffaccel looks for a torch module at "
        f"pipe.{' or pipe.'.join(DENOISER_ATTRIBUTES)}."
    )


def find_experts(pipe: Any, denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's other denoisers (``EXPERT_ATTRIBUTES``), as (attribute, module), the main one excluded."""
    experts = []
    for name in EXPERT_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and unwrap_denoiser(module) is not denoiser:
            experts.append((name, unwrap_denoiser(module)))
    return experts


def accelerate(
    pipe: Any,
    config: Any = None,
    *,
    cache: Any = None,
    guidance: Any = None,
    sampling: Any = None,
    attention: Any = None,
    parallel: Any = None,
) -> Any:
    """Accelerate a diffusers pipeline in place and return it.

    >>> pipe = diffaccel.accelerate(pipe, "fast")
    >>> pipe = diffaccel.accelerate(pipe, cache="block")
    >>> pipe = diffaccel.accelerate(pipe, cache=diffaccel.BlockCacheConfig(threshold=0.1))

    Calling it again replaces the previous configuration, and is validated against the pipeline without
    it. Everything is validated before any hook is installed, and a failure (a bad config, or while
    installing) leaves the pipeline as it was, previous acceleration included.
    """
    denoiser = find_denoiser(pipe)
    adapter = adapter_for(denoiser)
    # The pipeline is judged as it is without diffaccel: what a previous acceleration changed (a student's
    # scheduler, say) must not decide what this one can do. If this one fails, the previous one is put back.
    previous = getattr(pipe, PIPE_ATTRIBUTE, None)
    remove(pipe)
    try:
        resolved = resolve_config(
            config,
            unet=not adapter.block_cache,
            pipe=pipe,
            cache=cache,
            guidance=guidance,
            sampling=sampling,
            attention=attention,
            parallel=parallel,
        )
        _install(pipe, denoiser, adapter, resolved)
    except BaseException:
        if previous is not None:
            try:
                _install(pipe, denoiser, adapter, previous.config)
            except Exception as error:  # pragma: no cover - it was installed before
                logger.warning("diffaccel: could not put the previous acceleration back: %s", error)
        raise
    return pipe


def _install(pipe: Any, denoiser: torch.nn.Module, adapter: Any, config: AccelConfig) -> None:
    """Validate ``config`` on the plain pipeline and install it, on the main denoiser and on each expert;
    on failure nothing stays installed."""
    target = AccelTarget(pipe=pipe, denoiser=denoiser, adapter=adapter)
    experts = find_experts(pipe, denoiser)
    _check_expert_names(config, pipe, experts)
    resolved = _validated(_for_experts(config, pipe, experts), target)
    runtime = _install_runtime(target, resolved)
    runtime.name = next((name for name in DENOISER_ATTRIBUTES if isinstance(getattr(pipe, name, None), torch.nn.Module)
                         and unwrap_denoiser(getattr(pipe, name)) is denoiser), runtime.name)
    try:
        for name, expert in experts:
            expert_target = AccelTarget(pipe=pipe, denoiser=expert, adapter=adapter_for(expert))
            expert_config = _validated(resolved.without(*PIPELINE_SLOTS).for_expert(name), expert_target)
            runtime.add_expert(name, _install_runtime(expert_target, expert_config, primary=runtime,
                                                      branch=EXPERT_BRANCHES.get(name)))
    except BaseException:
        runtime.remove()
        raise
    setattr(pipe, PIPE_ATTRIBUTE, runtime)
    logger.info(
        "diffaccel: accelerated %s (%s%s) with %s",
        type(pipe).__name__,
        target.adapter.name,
        "".join(f", and {name}" for name, _ in experts),
        ", ".join(f"{m.slot}={m.method}" for m in resolved.methods()) or "no method (off)",
    )


def _check_expert_names(config: AccelConfig, pipe: Any, experts: list) -> None:
    """Settings for an expert the pipeline does not have would silently do nothing: refuse them by name."""
    have = [name for name, _ in experts]
    for method in config.methods():
        unknown = sorted(set(method.expert_names()) - set(have))
        if unknown:
            raise ValueError(
                f"{type(method).__name__} has settings for expert(s) {unknown}, which {type(pipe).__name__} does not "
                f"have; its expert denoisers: {have or 'none (one denoiser)'}."
            )


def _for_experts(config: AccelConfig, pipe: Any, experts: list) -> AccelConfig:
    """Refuse (or, where optional, leave out with a warning) what cannot serve a pipeline with experts."""
    if not experts:
        return config
    dropped = []
    refusals = dict(NOT_WITH_EXPERTS)
    for expert, _ in experts:
        refusals.update(NOT_WITH_EXPERT.get(expert, {}))
    for (slot, name), why in refusals.items():
        method = getattr(config, slot)
        if method is None or name not in (None, method.method):
            continue
        message = (f"{slot}={method.method} cannot serve {type(pipe).__name__} with a second denoiser "
                   f"({', '.join(name for name, _ in experts)}) yet: {why}")
        if slot not in config.optional:
            raise ValueError(message + ".")
        logger.warning("diffaccel: running without %s (optional in this config): %s", slot, message)
        dropped.append(slot)
    return config.without(*dropped) if dropped else config


def _install_runtime(target: AccelTarget, config: AccelConfig, primary: Runtime | None = None,
                     branch: str | None = None) -> Runtime:
    """One denoiser's runtime with every method of ``config`` installed; nothing stays on failure."""
    planned = [(method, handler_for(method)) for method in config.methods()]
    registry = getattr(target.denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(RUNTIME_HOOK) is not None:
        raise ValueError(
            f"This {target.denoiser_name} is already accelerated through another pipeline object that shares it; "
            f"call diffaccel.remove() on that pipeline first."
        )
    runtime = Runtime(target.pipe, target.denoiser, target.adapter, config, primary=primary, branch=branch)
    try:
        for method, handler in planned:
            handler.apply(method, target, runtime)
        for method, handler in planned:  # hooks that must wrap every method's hooks on the same modules
            finish = getattr(handler, "apply_outer", None)
            if finish is not None:
                finish(method, target, runtime)
        runtime.install_denoiser_hook()
    except BaseException:
        runtime.remove()
        raise
    return runtime


def remove(pipe: Any) -> Any:
    """Take every diffaccel hook and processor off ``pipe``; its output is then the original's."""
    runtime = getattr(pipe, PIPE_ATTRIBUTE, None)
    if runtime is not None:
        runtime.remove()
        delattr(pipe, PIPE_ATTRIBUTE)
    return pipe


def runtime_of(pipe: Any) -> Runtime:
    runtime = getattr(pipe, PIPE_ATTRIBUTE, None)
    if runtime is None:
        raise ValueError(f"This {type(pipe).__name__} is not accelerated; call diffaccel.accelerate(pipe, ...) first.")
    return runtime


def stats(pipe: Any, cumulative: bool = False) -> dict:
    """What the last pipeline call computed and skipped (``cumulative=True``: since ``accelerate``).

    Keys include ``steps``, ``denoiser_calls`` (one per CFG branch evaluated: a doubled batch
    counts two), ``denoiser_forwards``, ``blocks_computed``, ``blocks_skipped`` and per-method counters.
    """
    return runtime_of(pipe).stats(cumulative=cumulative)


def config_of(pipe: Any) -> AccelConfig:
    """The configuration a pipeline is accelerated with."""
    return runtime_of(pipe).config
