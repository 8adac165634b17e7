"""The two CFG layouts seen from the denoiser: halves of a doubled batch, and output structures.

A pipeline that runs CFG as one doubled batch calls the denoiser with ``cat([uncond, cond])`` in every
batch-shaped argument (diffusers puts the unconditional half first; the family adapter's
``cfg_batch_order`` says where a pipeline differs, e.g. Z-Image's ``[cond, uncond]``). Running only the
conditional half means slicing every such argument; the prediction is then put back into a doubled output
so the pipeline's own CFG formula runs unchanged. A denoiser that takes its latents as a list of per-image
tensors (Z-Image) gets its per-sample lists sliced, and its list of predictions is handled stacked.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils import BaseOutput

from diffaccel.pipelines.adapters import is_tensor_list

# Forward arguments that are never batch-shaped, even when their first dimension happens to equal the
# doubled batch size: rotary tables and position ids are (tokens, ...), image shapes are a list per sample
# of the *unbatched* grid.
NOT_BATCHED = frozenset(
    {"image_rotary_emb", "rotary_emb", "img_ids", "txt_ids", "img_shapes", "rope_interpolation_scale"}
)
# Forward arguments whose batch dimension is not the first: HiDream-I1 stacks its Llama layers' states as
# (layers, batch, tokens, channels).
BATCH_DIM = {"encoder_hidden_states_llama3": 1}


def batch_half(value: Any, full: int, which: int, name: str | None = None, per_sample_lists: bool = False) -> Any:
    """``value`` with every tensor whose first dimension is the doubled batch ``full`` cut to its first
    (``which=0``) or second (``which=1``) half; dicts, lists and tuples are walked, everything else is
    returned as is. With ``per_sample_lists`` a list of ``full`` tensors is one entry per sample (Z-Image's
    latents and captions) and is cut itself."""
    if name in NOT_BATCHED:
        return value
    half = full // 2
    if isinstance(value, torch.Tensor) and name in BATCH_DIM:
        dim = BATCH_DIM[name]
        return value.narrow(dim, half * which, half) if value.dim() > dim and value.shape[dim] == full else value
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == full:
            return value[half * which : half * (which + 1)]
        return value
    if isinstance(value, dict):
        return type(value)((key, batch_half(item, full, which, key, per_sample_lists)) for key, item in value.items())
    if per_sample_lists and isinstance(value, list) and len(value) == full and is_tensor_list(value):
        return value[half * which : half * (which + 1)]
    if isinstance(value, (list, tuple)) and not _is_namedtuple(value):
        return type(value)(batch_half(item, full, which, None, per_sample_lists) for item in value)
    return value


def cond_half(value: Any, full: int, name: str | None = None) -> Any:
    """``value`` cut to the conditional (second) half of a doubled batch."""
    return batch_half(value, full, 1, name)


def half_arguments(args: tuple, kwargs: dict, full: int, names: list[str], which: int,
                   per_sample_lists: bool = False) -> tuple[tuple, dict]:
    """All forward arguments cut to one half of a doubled batch; ``names`` are the positional parameter names."""
    sliced_args = tuple(
        batch_half(value, full, which, names[i] if i < len(names) else None, per_sample_lists)
        for i, value in enumerate(args)
    )
    sliced_kwargs = {key: batch_half(value, full, which, key, per_sample_lists) for key, value in kwargs.items()}
    return sliced_args, sliced_kwargs


def cond_half_arguments(args: tuple, kwargs: dict, full: int, names: list[str], which: int = 1,
                        per_sample_lists: bool = False) -> tuple[tuple, dict]:
    """All forward arguments cut to the conditional half (the second in diffusers' order; ``which`` else)."""
    return half_arguments(args, kwargs, full, names, which, per_sample_lists)


def _is_listed(value: Any) -> bool:
    """A list of per-image predictions (Z-Image), as opposed to an output tuple."""
    return isinstance(value, list) and is_tensor_list(value)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction tensor in what a denoiser returned: the tensor itself, the first element of a tuple,
    or the first field of a ``BaseOutput`` (``Transformer2DModelOutput.sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, BaseOutput):
        first = output[0]
        return torch.stack(first) if _is_listed(first) else first
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, tuple) and output and _is_listed(output[0]):  # per-image predictions (Z-Image)
        return torch.stack(output[0])
    raise ValueError(
        f"diffaccel: cannot find the prediction in a denoiser output of type {type(output).__name__}; "
        f"expected a tensor, a tuple starting with one, or a diffusers BaseOutput."
    )


def latent_prediction(prediction: torch.Tensor, latents: Any) -> torch.Tensor:
    """The prediction for the latent tokens: a denoiser that returns its whole joined sequence (Qwen-Image 2.1's
    first step, [text, image]) predicts the latents with its last tokens, which its pipeline keeps."""
    if (isinstance(latents, torch.Tensor) and prediction.dim() == 3 and latents.dim() == 3
            and prediction.shape[1] > latents.shape[1]):
        return prediction[:, -latents.shape[1]:]
    return prediction


def with_prediction(output: Any, prediction: torch.Tensor) -> Any:
    """The same structure as ``output`` with its prediction replaced (other fields kept)."""
    if isinstance(output, torch.Tensor):
        return prediction
    if isinstance(output, BaseOutput):
        keys = list(output.keys())
        first = list(prediction.unbind(0)) if _is_listed(output[keys[0]]) else prediction
        return type(output)(**{key: (first if i == 0 else output[key]) for i, key in enumerate(keys)})
    if isinstance(output, (tuple, list)):
        first = list(prediction.unbind(0)) if _is_listed(output[0]) else prediction
        return type(output)([first, *output[1:]])
    raise ValueError(f"diffaccel: cannot rebuild a denoiser output of type {type(output).__name__}.")


def with_other_outputs(output: Any, fn) -> Any:
    """``output`` with ``fn`` applied to every tensor it holds besides the prediction (LTX-2's audio prediction
    next to its video one), so a doubled-batch output can be rebuilt whole."""
    if isinstance(output, BaseOutput):
        keys = list(output.keys())
        return type(output)(**{key: (fn(output[key]) if i and isinstance(output[key], torch.Tensor) else output[key])
                               for i, key in enumerate(keys)})
    if isinstance(output, tuple) and not _is_namedtuple(output):
        return type(output)(fn(item) if i and isinstance(item, torch.Tensor) else item for i, item in enumerate(output))
    return output


def same_tensor(a: Any, b: Any) -> bool:
    """The same object, or tensors of equal shape, dtype and values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return False


def same_value(a: Any, b: Any) -> bool:
    """Equal forward arguments: tensors by value, containers walked, the rest by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return same_tensor(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return a is b


def same_arguments(args_a: tuple, kwargs_a: dict, args_b: tuple, kwargs_b: dict) -> bool:
    """Two calls with equal positional and keyword arguments."""
    return same_value(list(args_a), list(args_b)) and same_value(kwargs_a, kwargs_b)
