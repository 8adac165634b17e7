"""Where a model computes, which under offloading is not where its weights rest.

accelerate's device hooks (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, device-map
dispatch) keep the weights on the CPU or the meta device and name an ``execution_device``; diffusers'
group offloading keeps them on the CPU and onloads them to its group's ``onload_device``. Choices that
depend on the device (a GPU kernel, a device mesh) must ask those first.
"""

from __future__ import annotations

from typing import Any

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: an offload hook's execution/onload device if one is installed,
    else the first parameter not on the meta device, else the CPU."""
    for submodule in module.modules():
        device = _offload_device(submodule)
        if device is not None:
            return torch.device(device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _offload_device(module: torch.nn.Module) -> Any:
    hook = getattr(module, "_hf_hook", None)  # accelerate: AlignDevicesHook, CpuOffload, or a SequentialHook of them
    for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(candidate, "execution_device", None) is not None:
            return candidate.execution_device
    registry = getattr(module, "_diffusers_hook", None)  # diffusers: group offloading's hooks carry their group
    for candidate in (registry.hooks.values() if registry is not None else ()):
        group = getattr(candidate, "group", None)
        if getattr(group, "onload_device", None) is not None:
            return group.onload_device
    return None
