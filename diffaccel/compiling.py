"""``torch.compile`` of a pipeline's denoisers, after diffaccel's hooks are in place (``--compile`` in the CLI).

"blocks" is regional compilation, as diffusers' ``compile_repeated_blocks``: each repeated transformer block
is compiled once and the graph reused for every block of its class, so compiling costs seconds rather than
minutes and most of the speed of a full compile remains. The blocks are the classes the model declares in
``_repeated_blocks``, else the block lists diffaccel's family adapter knows. "full" compiles the whole denoiser. diffaccel's
data-dependent decisions (skip a block, reuse a residual) are fenced with ``torch.compiler.disable``, so the
hooks stay correct under either mode; a skipped block simply does not run its compiled graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("diffaccel")

COMPILE_MODES = ("off", "blocks", "full")


def add_compile_options(parser: Any) -> None:
    """The CLI's ``--compile`` and ``--compile-backend``."""
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off",
                        help="torch.compile the denoiser after acceleration: blocks (regional: each repeated block, "
                        "seconds to compile) or full (the whole model); default off")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; e.g. cudagraphs, aot_eager)")


def compile_denoisers(pipe: Any, mode: str = "blocks", **compile_kwargs: Any) -> list[str]:
    """Compile the denoiser and any second expert of ``pipe`` in place; returns what was compiled, e.g.
    ``["transformer: 12 WanTransformerBlock blocks"]``. ``compile_kwargs`` go to ``torch.compile``
    (``backend``, ``mode``, ``fullgraph``, ``dynamic``)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {list(COMPILE_MODES)}, got {mode!r}.")
    if mode == "off":
        return []
    from .api import find_denoiser, find_experts

    denoiser = find_denoiser(pipe)
    main = next(name for name in ("transformer", "unet", "transformer_2") if getattr(pipe, name, None) is denoiser)
    done = []
    for name, module in [(main, denoiser), *find_experts(pipe, denoiser)]:
        done.append(f"{name}: {_compile_one(module, mode, compile_kwargs)}")
    logger.info("diffaccel: compiled %s", "; ".join(done))
    return done


def _compile_one(module: torch.nn.Module, mode: str, compile_kwargs: dict[str, Any]) -> str:
    blocks = _repeated_blocks(module) if mode == "blocks" else []
    if blocks:
        for block in blocks:
            block.compile(**compile_kwargs)  # what diffusers' compile_repeated_blocks does, for our block lists too
        kinds = sorted({type(b).__name__ for b in blocks})
        return f"{len(blocks)} {'/'.join(kinds)} blocks"
    if mode == "blocks":
        logger.warning("diffaccel: %s has no known repeated blocks for regional compilation; compiling the whole "
                       "model instead", type(module).__name__)
    module.compile(**compile_kwargs)
    return f"the whole {type(module).__name__}"


def _repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to compile one by one: the classes diffusers lists in ``_repeated_blocks``, else the
    block lists of diffaccel's adapter for the family (PixArt, SD3, CogView4, CogVideoX and Sana declare
    none in diffusers 0.42)."""
    declared = tuple(getattr(module, "_repeated_blocks", None) or ())
    if declared:
        return [m for m in module.modules() if type(m).__name__ in declared]
    from diffaccel.pipelines import adapter_for

    try:
        adapter = adapter_for(module)
    except ValueError:
        return []
    return [block for name in adapter.block_lists for block in (getattr(module, name, None) or ())]
