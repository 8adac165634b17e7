"""Process groups for CFG × context parallel, and diffusers' context parallelism driven from our config.

The mesh has the axes ``("cfg", "ring", "ulysses")``; the ``(ring, ulysses)`` sub-mesh goes to
diffusers' ``ContextParallelConfig(mesh=...)``, so each CFG group runs its own context-parallel
model. diffusers 0.42's ``enable_parallelism`` picks its device as ``rank % accelerator count``,
which divides by zero on a CPU-only (gloo) job; there we record the same config and apply the same
context-parallel plan ourselves (``_enable_on_cpu``), everywhere else ``enable_parallelism`` runs as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffaccel.devices import execution_device
from diffaccel.runtime import remove_hook


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    cfg: int
    ring: int
    ulysses: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh

    @property
    def cfg_group(self):
        return self.mesh["cfg"].get_group() if self.cfg > 1 else None

    @property
    def cfg_rank(self) -> int:
        return self.mesh["cfg"].get_local_rank() if self.cfg > 1 else 0

    @property
    def context_degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def context_group(self):
        if self.context_degree == 1:
            return None
        return self.mesh["ring", "ulysses"]._flatten().get_group()


def require_distributed(label: str) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{label} needs a torch.distributed job: launch with `torchrun --nproc_per_node=N your_script.py` and call "
            f"torch.distributed.init_process_group() (backend 'nccl' on GPUs, 'gloo' on CPU) before accelerate()."
        )
    return dist.get_rank(), dist.get_world_size()


def execution_device_type(module: torch.nn.Module) -> str:
    """The device type the denoiser computes on (under offloading, not where its weights rest)."""
    return execution_device(module).type


def build_groups(degrees: tuple[int, int, int], device_type: str) -> ParallelGroups:
    from torch.distributed.device_mesh import init_device_mesh

    cfg, ring, ulysses = degrees
    mesh = init_device_mesh(device_type, (cfg, ring, ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
    return ParallelGroups(dist.get_rank(), dist.get_world_size(), cfg, ring, ulysses, mesh)


def enable_context_parallel(denoiser: torch.nn.Module, groups: ParallelGroups) -> None:
    """diffusers' context parallelism on this CFG group's (ring, ulysses) sub-mesh."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=groups.ring, ulysses_degree=groups.ulysses, mesh=groups.mesh["ring", "ulysses"])
    if execution_device_type(denoiser) == "cpu":
        _enable_on_cpu(denoiser, config)
    else:
        denoiser.enable_parallelism(config=config)


def _enable_on_cpu(denoiser: torch.nn.Module, cp_config) -> None:
    """What ``enable_parallelism`` does for context parallelism, with the CPU as the device."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

    config = DiffusersParallelConfig(context_parallel_config=cp_config)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=cp_config.mesh)
    denoiser._parallel_config = config
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(denoiser, cp_config, denoiser._cp_plan)


def disable_context_parallel(denoiser: torch.nn.Module, hook_names_before: dict) -> None:
    """Take away the context-parallel hooks and configs (``diffaccel.remove``)."""
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in list(registry.hooks):
                if name not in hook_names_before.get(id(module), ()):
                    remove_hook(module, name)
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = None
    denoiser._parallel_config = None


def hook_names(denoiser: torch.nn.Module) -> dict:
    names = {}
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            names[id(module)] = set(registry.hooks)
    return names
