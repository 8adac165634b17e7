"""The pipeline-call wrapper that sampling methods run their calls through.

Methods that change the sampling loop itself (bottleneck stages, a distilled student) need the whole
pipeline call, not one denoiser forward. ``wrap_pipeline_call`` gives the accelerated pipeline object a
subclass of its own class whose ``__call__`` hands the call to the handler of the runtime's sampling
method (its ``call(pipe, original_call, config, args, kwargs)``); the class itself is never edited, and
``remove`` gives the object its class back.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

BASE_CLASS_ATTRIBUTE = "_diffaccel_base_class"
_WRAPPED: dict[type, type] = {}


def base_class(pipe: Any) -> type:
    """The pipeline's own class, under any wrapper this module put on it."""
    return getattr(type(pipe), BASE_CLASS_ATTRIBUTE, type(pipe))


def _wrapped_class(cls: type) -> type:
    if cls not in _WRAPPED:
        original_call = cls.__call__

        def __call__(self, *args, **kwargs):
            from diffaccel.registry import handler_for

            runtime = getattr(self, "_diffaccel_runtime", None)
            config = getattr(getattr(runtime, "config", None), "sampling", None)
            call = getattr(handler_for(config), "call", None) if config is not None else None
            if call is None:
                return original_call(self, *args, **kwargs)
            return call(self, original_call, config, args, kwargs)

        __call__.__signature__ = inspect.signature(original_call)
        __call__.__doc__ = original_call.__doc__
        _WRAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                  BASE_CLASS_ATTRIBUTE: cls})
    return _WRAPPED[cls]


def wrap_pipeline_call(pipe: Any, add_cleanup: Callable[[Callable[[], None]], None]) -> None:
    """Route ``pipe``'s calls through its runtime's sampling method until the cleanup runs."""
    base = base_class(pipe)
    pipe.__class__ = _wrapped_class(base)

    def restore() -> None:
        pipe.__class__ = base

    add_cleanup(restore)


def call_kwargs(original_call: Callable, args: tuple, kwargs: dict) -> dict:
    """A call's positional arguments turned into keywords (the pipeline's own parameter names)."""
    if not args:
        return dict(kwargs)
    return dict(zip(list(inspect.signature(original_call).parameters)[1:], args), **kwargs)
