"""The guidance-scale embedding of consistency students (LCM's w-embedding): the CFG scale becomes an
input of the student, so one student samples at any scale of its training range, still with one
evaluation per step.

LCM (Luo et al. 2023) adds a zero-initialised projection of a sinusoidal embedding of the scale to the
timestep projection, the ``condition`` of diffusers' ``TimestepEmbedding(cond_proj_dim=...)``.
Transformers build their timestep embedder without that projection and call it without a condition,
so diffaccel gives the embedder the projection and passes the condition with a diffusers ``ModelHook``
that reads the scale from ``GuidanceEmbeddingHook.scale``. Zero-initialised, the student starts as
exactly the model it was made from; ``scale`` None (the teacher's view of a shared transformer) passes
no condition at all.
"""

from __future__ import annotations

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding

from diffaccel.runtime import remove_hook

HOOK_NAME = "diffaccel_guidance_embedding"
WEIGHTS = "guidance_embedding.safetensors"
DEFAULT_DIM = 256  # LCM's `time_cond_proj_dim`
EMBEDDER_NAMES = ("timestep_embedder", "time_embedder", "time_embedding")


def guidance_features(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000·(g − 1), g the pipelines' CFG scale: LCM embeds w = g − 1 (its CFG is
    written x_c + w(x_c − x_∅)), with the frequencies of its ``get_guidance_scale_embedding``."""
    return get_timestep_embedding(1000.0 * (scale.float() - 1.0), dim, flip_sin_to_cos=False, downscale_freq_shift=1)


def timestep_embedder(transformer: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The transformer's timestep embedder (a diffusers ``TimestepEmbedding``) and its name; an error that
    says why when there is none, or several that could be it."""
    found = [(name, module) for name, module in transformer.named_modules() if isinstance(module, TimestepEmbedding)]
    named = [(name, module) for name, module in found if name.rsplit(".", 1)[-1] in EMBEDDER_NAMES]
    candidates = named or found
    if len(candidates) != 1:
        listed = ", ".join(name for name, _ in found) or "none"
        raise ValueError(f"A guidance-scale embedding goes into the timestep embedder of {type(transformer).__name__}, "
                         f"and diffaccel cannot tell which that is (TimestepEmbedding modules: {listed}).")
    return candidates[0]


class GuidanceProjection(torch.nn.Linear):
    """The embedder's ``cond_proj``: a bias-free linear map whose output takes the dtype of the embedder's
    own weights, so it may be kept in float32 (trained over a half-precision teacher, as LoRA adapters
    are) and still add to the timestep projection in the teacher's dtype."""

    def __init__(self, dim: int, features: int, out_dtype: torch.dtype) -> None:
        super().__init__(dim, features, bias=False)
        self.out_dtype = out_dtype

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return super().forward(condition.to(self.weight.dtype)).to(self.out_dtype)


class GuidanceEmbeddingHook(ModelHook):
    """Feeds the embedded guidance scale to the timestep embedder as its ``condition``.

    ``scale``: None (no condition: the model without the embedding), a number (every sample), or one
    value per sample of the batch (training draws a scale per example)."""

    def __init__(self, dim: int, scale: float | torch.Tensor | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.scale is None:
            return args, kwargs
        sample = args[0] if args else kwargs["sample"]
        scale = torch.as_tensor(self.scale, dtype=torch.float32).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(sample.shape[0])
        elif scale.numel() != sample.shape[0]:
            raise ValueError(f"The guidance embedding holds {scale.numel()} scales for a batch of {sample.shape[0]}.")
        features = guidance_features(scale, self.dim).to(device=sample.device, dtype=sample.dtype)
        if len(args) > 1:  # embedder(sample, condition): UNets pass their (absent) condition by position
            return (args[0], features, *args[2:]), kwargs
        kwargs["condition"] = features
        return args, kwargs


def add_guidance_embedding(transformer: torch.nn.Module, dim: int = DEFAULT_DIM,
                           weight: torch.Tensor | None = None) -> GuidanceEmbeddingHook:
    """Give ``transformer``'s timestep embedder a guidance projection (zero, or ``weight``) and the hook
    that feeds it; returns the hook, whose ``scale`` starts as None (no effect)."""
    _, embedder = timestep_embedder(transformer)
    if getattr(embedder, "cond_proj", None) is not None:
        raise ValueError(f"The timestep embedder of {type(transformer).__name__} already has a condition projection "
                         f"(a guidance embedding is installed, or the model has its own).")
    reference = embedder.linear_1.weight
    projection = GuidanceProjection(dim, embedder.linear_1.in_features, reference.dtype)
    with torch.no_grad():
        if weight is None:
            projection.weight.zero_()
        else:
            if tuple(weight.shape) != tuple(projection.weight.shape):
                raise ValueError(f"The guidance embedding's weight has shape {tuple(weight.shape)}; this "
                                 f"{type(transformer).__name__} needs {tuple(projection.weight.shape)}.")
            projection.weight.copy_(weight)
    embedder.cond_proj = projection.to(device=reference.device, dtype=reference.dtype)
    hook = GuidanceEmbeddingHook(dim)
    HookRegistry.check_if_exists_or_initialize(embedder).register_hook(hook, HOOK_NAME)
    return hook


def guidance_hook(transformer: torch.nn.Module) -> GuidanceEmbeddingHook | None:
    """The installed guidance-embedding hook of ``transformer``, or None."""
    try:
        _, embedder = timestep_embedder(transformer)
    except ValueError:
        return None
    registry = getattr(embedder, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def guidance_projection(transformer: torch.nn.Module) -> torch.nn.Linear:
    """The guidance projection of ``transformer`` (an error if it has none)."""
    _, embedder = timestep_embedder(transformer)
    if guidance_hook(transformer) is None:
        raise ValueError(f"{type(transformer).__name__} has no guidance embedding installed.")
    return embedder.cond_proj


def projection_key(transformer: torch.nn.Module) -> str:
    """The state-dict key of the projection's weight (kept out of a full student's transformer/ folder)."""
    return f"{timestep_embedder(transformer)[0]}.cond_proj.weight"


def remove_guidance_embedding(transformer: torch.nn.Module) -> None:
    """Take the hook and the projection out again: the transformer is the one it was before."""
    _, embedder = timestep_embedder(transformer)
    remove_hook(embedder, HOOK_NAME)
    embedder.cond_proj = None


def check_scale(scale: float, scale_range: tuple[float, float] | list[float], what: str = "guidance_scale") -> float:
    """``scale`` if it lies in the range the student was trained on; an error naming the range otherwise."""
    low, high = scale_range
    if not low <= float(scale) <= high:
        raise ValueError(f"{what}={scale}: this student was distilled with guidance scales in [{low}, {high}]; "
                         f"choose one in that range.")
    return float(scale)
