"""Model-family adapters (installed as ``diffaccel.pipelines``).

One row per supported denoiser class and per block class: the runtime reads them; no per-model code.
"""

from .adapters import (
    BlockSpec,
    BoundBlock,
    FamilyAdapter,
    adapter_for,
    block_spec_for,
    register_adapter,
    register_block_spec,
    register_block_wrapper,
    supported_denoisers,
    unwrap_denoiser,
)
from .families import register_builtin_families

register_builtin_families()

__all__ = [
    "BlockSpec",
    "BoundBlock",
    "FamilyAdapter",
    "adapter_for",
    "block_spec_for",
    "register_adapter",
    "register_block_spec",
    "register_block_wrapper",
    "supported_denoisers",
    "unwrap_denoiser",
]
