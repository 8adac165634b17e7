"""Multi-GPU inference degrees: CFG parallel × context (sequence) parallel.

``ParallelConfig(cfg=2, ulysses=2)`` on 4 ranks runs the two CFG branches on two groups of two ranks,
each group splitting the token sequence with Ulysses attention. A degree of 0 means "what the world
size leaves" (at most one degree may be 0). The product of the degrees must equal the world size of
the ``torch.distributed`` job (``torchrun --nproc_per_node=N``); anything else is refused naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.config import MethodConfig, check_int, register_config


@register_config
@dataclass(frozen=True)
class ParallelConfig(MethodConfig):
    """Degrees of parallelism (``parallel="hybrid"``; ``"cfg"`` and ``"context"`` are named defaults).

    Args:
        cfg: 1 or 2; with 2 the conditional and unconditional branches run on different ranks and
            meet in one all-gather per step.
        ulysses: Ulysses context-parallel degree (diffusers' ``ContextParallelConfig``): heads are
            exchanged all-to-all so each rank attends over the full sequence for its share of heads.
        ring: ring-attention degree (needs a GPU attention backend that returns log-sum-exp).
    """

    slot = "parallel"
    method = "hybrid"

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "cfg", self.cfg, minimum=0, maximum=2)
        check_int(name, "ulysses", self.ulysses, minimum=0)
        check_int(name, "ring", self.ring, minimum=0)
        if [self.cfg, self.ulysses, self.ring].count(0) > 1:
            raise ValueError(f"{name}: at most one degree may be 0 (= the rest of the world size), got {self}.")

    def degrees(self, world_size: int) -> tuple[int, int, int]:
        """(cfg, ring, ulysses) for this world size; a ValueError naming the world size if they do not fit."""
        known = [d for d in (self.cfg, self.ring, self.ulysses) if d]
        product = 1
        for d in known:
            product *= d
        label = f"cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses}"
        if len(known) == 3:
            if product != world_size:
                raise ValueError(
                    f"{type(self).__name__}: {label} = {product} ranks, but the job has world size {world_size}; "
                    f"the product of the degrees must equal the world size."
                )
            return self.cfg, self.ring, self.ulysses
        if world_size % product:
            raise ValueError(
                f"{type(self).__name__}: {label} leaves a degree for world size {world_size}, which is not a multiple "
                f"of {product}."
            )
        rest = world_size // product
        cfg, ring, ulysses = (d or rest for d in (self.cfg, self.ring, self.ulysses))
        if cfg > 2:
            raise ValueError(f"{type(self).__name__}: the CFG degree would be {cfg} for world size {world_size}; it is 1 or 2.")
        return cfg, ring, ulysses


@register_config
@dataclass(frozen=True)
class CfgParallelConfig(ParallelConfig):
    """``parallel="cfg"``: the two CFG branches on two ranks (the rest, if any, context parallel)."""

    method = "cfg"
    cfg: int = 2
    ulysses: int = 0


@register_config
@dataclass(frozen=True)
class ContextParallelDegrees(ParallelConfig):
    """``parallel="context"``: Ulysses over all ranks (no CFG parallel)."""

    method = "context"
    ulysses: int = 0
