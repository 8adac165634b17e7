"""LoRA adapters on any diffusers denoiser, including classes diffusers gives no adapter methods (PixArt).

The trainers and the student loader use diffusers' ``PeftAdapterMixin`` API (``add_adapter``,
``set_adapter``, ``disable_adapters``, ``load_lora_adapter``, ``fuse_lora``, ``unload_lora``). A denoiser
class without it (``PixArtTransformer2DModel`` in diffusers 0.42) gets it the way
``torch.nn.utils.parametrize`` adds behaviour to a module: the instance's class is swapped for a
subclass that mixes it in. The subclass keeps the class's name and module, so configs, ``isinstance``
checks and ``save_pretrained`` see the same model; ``remove_adapter_support`` swaps the class back.

A pipeline without a LoRA loader (PixArt's) saves and loads the student's LoRA in the same file layout
as diffusers' ``save_lora_weights`` (peft names under ``"<component>."``), so one student format serves
every pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_ADDED_MARK = "_diffaccel_adapter_support"


def with_adapter_support(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with diffusers' adapter methods: unchanged if its class has them, else its class swapped
    for a same-named subclass that mixes in ``PeftAdapterMixin`` (undone by ``remove_adapter_support``)."""
    if hasattr(model, "add_adapter"):
        return model
    from diffusers.loaders.peft import PeftAdapterMixin

    base = type(model)
    model.__class__ = type(base.__name__, (base, PeftAdapterMixin),
                           {"__module__": base.__module__, "__doc__": base.__doc__, _ADDED_MARK: base})
    return model


def remove_adapter_support(model: torch.nn.Module) -> None:
    """Swap back a class that ``with_adapter_support`` swapped (the model must hold no adapters by then)."""
    base = type(model).__dict__.get(_ADDED_MARK)
    if base is None:
        return
    if getattr(model, "peft_config", None):
        raise RuntimeError(f"{base.__name__} still holds LoRA adapters ({', '.join(model.peft_config)}); unload "
                           "them before removing adapter support.")
    model.__class__ = base


def save_lora(folder: Path, weight_name: str, component: str, layers: dict[str, torch.Tensor],
              pipeline_class: Any) -> None:
    """Write LoRA ``layers`` (peft names, relative to the denoiser) as the pipeline's LoRA loader reads them:
    through ``pipeline_class.save_lora_weights`` when it has one, else in its layout ourselves."""
    if hasattr(pipeline_class, "save_lora_weights"):
        pipeline_class.save_lora_weights(folder, **{f"{component}_lora_layers": layers}, weight_name=weight_name)
        return
    state = {f"{component}.{name}": tensor.detach().to("cpu").contiguous() for name, tensor in layers.items()}
    save_file(state, str(Path(folder) / weight_name), metadata={"format": "pt"})


def load_lora_into(pipe: Any, component: str, source: str | Path, adapter_name: str, **options: Any) -> None:
    """Load a LoRA into ``pipe``'s ``component``: the pipeline's ``load_lora_weights`` when it has a LoRA
    loader, else the denoiser's own ``load_lora_adapter`` (with adapter support added). ``options`` go to
    the loader (``weight_name``, ``load_into_transformer_2``)."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(source, adapter_name=adapter_name, **options)
        return
    denoiser = with_adapter_support(getattr(pipe, component))
    denoiser.load_lora_adapter(str(source), prefix=component, adapter_name=adapter_name, **options)


def fuse_and_unload_lora(pipe: Any, component: str) -> None:
    """Fuse the loaded LoRA into ``component``'s weights and drop the adapter layers (the denoiser is a
    plain model of its own class again)."""
    denoiser = getattr(pipe, component)
    if hasattr(pipe, "fuse_lora") and hasattr(pipe, "unload_lora_weights"):
        pipe.fuse_lora(lora_scale=1.0, components=[component])
        pipe.unload_lora_weights()
    else:
        denoiser.fuse_lora(lora_scale=1.0)
        denoiser.unload_lora()
    remove_adapter_support(denoiser)
