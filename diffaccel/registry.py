"""Config type -> method handler. Adding a method never edits ``accelerate``.

A handler validates its config against the model (clear error before anything is installed) and
then installs its hooks through the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from diffaccel.pipelines.adapters import BoundBlock, FamilyAdapter

from .config import MethodConfig

if TYPE_CHECKING:
    from .runtime import Runtime


@dataclass
class AccelTarget:
    """The pipeline being accelerated, its denoiser and what the adapter says about it."""

    pipe: Any
    denoiser: torch.nn.Module
    adapter: FamilyAdapter
    _blocks: list[BoundBlock] | None = field(default=None, repr=False)

    @property
    def denoiser_name(self) -> str:
        return type(self.denoiser).__name__

    @property
    def blocks(self) -> list[BoundBlock]:
        """Flattened blocks with their specs (raises if a block class is undescribed)."""
        if self._blocks is None:
            self._blocks = self.adapter.find_blocks(self.denoiser)
        return self._blocks


class MethodHandler(Protocol):
    def validate(self, config: MethodConfig, target: AccelTarget) -> None: ...

    def apply(self, config: MethodConfig, target: AccelTarget, runtime: "Runtime") -> None: ...


_HANDLERS: dict[type, MethodHandler] = {}


def register_method(config_cls: type[MethodConfig]):
    """Class decorator pairing a handler with its config class."""

    def decorate(handler_cls):
        _HANDLERS[config_cls] = handler_cls()
        return handler_cls

    return decorate


def handler_for(config: MethodConfig) -> MethodHandler:
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ValueError(f"No handler is registered for {type(config).__name__}.") from None
