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


def call_subclass(cls: type, make_call: Callable[[Callable], Callable], **attributes: Any) -> type:
    """A subclass of ``cls`` with its name and module whose ``__call__`` is ``make_call(cls.__call__)``,
    showing the original's signature and docstring (pipelines and users inspect them)."""
    original_call = cls.__call__
    call = make_call(original_call)
    call.__signature__ = inspect.signature(original_call)
    call.__doc__ = original_call.__doc__
    return type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__, **attributes})


def _wrapped_class(cls: type) -> type:
    if cls not in _WRAPPED:
        _WRAPPED[cls] = call_subclass(cls, _routed_call, **{BASE_CLASS_ATTRIBUTE: cls})
    return _WRAPPED[cls]


def _routed_call(original_call: Callable) -> Callable:
    """``__call__`` handing the call to the handler of the runtime's sampling method, if it has one."""

    def __call__(self, *args, **kwargs):
        from diffaccel.registry import handler_for

        runtime = getattr(self, "_diffaccel_runtime", None)
        config = getattr(getattr(runtime, "config", None), "sampling", None)
        call = getattr(handler_for(config), "call", None) if config is not None else None
        if call is None:
            return original_call(self, *args, **kwargs)
        return call(self, original_call, config, args, kwargs)

    return __call__


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
