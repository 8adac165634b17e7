"""The guidance rules as small pure functions (Castillo et al., "Adaptive Guidance: Training-free
Acceleration of Conditional Diffusion Models", arXiv 2312.12487, AAAI 2025).

Nothing here knows about hooks, pipelines or the runtime: a step index, a few numbers and tensors
in, a decision or a tensor out. The hook (``adaptive.py``) and the tuner (``tune.py``) share them,
so what the tuner simulates is what the hook does.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# What happens to the unconditional branch at one step.
COMPUTE = "compute"  # evaluate it: plain CFG at this step
DROP = "drop"  # skip it and use the conditional prediction in its place (CFG then yields cond)
ESTIMATE = "estimate"  # skip it and use LinearAG's affine estimate in its place

# LinearAG regressors, in the order of a coefficient row.
LINEAR_TERMS = ("cond", "cond_prev", "uncond_prev", "latents")
# The training-free estimate used where no fitted row applies: eps_u(t) ~ eps_c(t) - (eps_c(t-1) - eps_u(t-1)),
# i.e. the guidance direction of the previous step carried over to this one.
CARRY_GUIDANCE = (1.0, -1.0, 1.0, 0.0)


def cosine_similarity(cond: torch.Tensor, uncond: torch.Tensor) -> float:
    """AG's gamma_t = cos(eps(x_t, c), eps(x_t, null)) over each sample's flattened prediction (Castillo et
    al.); the smallest over the batch, so every sample must agree before guidance is dropped."""
    c = cond.detach().reshape(cond.shape[0], -1).float()
    u = uncond.detach().reshape(uncond.shape[0], -1).float()
    return float(torch.nn.functional.cosine_similarity(c, u, dim=1).min())


def crosses(similarity: float, threshold: float) -> bool:
    """AG's truncation test gamma_t >= gamma_bar (Castillo et al.); gamma_bar <= -1 holds for any pair of predictions."""
    return threshold <= -1.0 or similarity >= threshold


def interval_bounds(num_steps: int, interval: tuple[float, float]) -> tuple[int, int]:
    """The guided steps [lo, hi) of a call of ``num_steps`` for an interval given as fractions of the steps
    (guidance in a limited interval; fractions rounded half up)."""
    start, end = interval
    return math.floor(start * num_steps + 0.5), math.floor(end * num_steps + 0.5)


def uncond_action(
    mode: str,
    step_index: int,
    num_steps: int | None,
    *,
    min_steps: int = 0,
    truncated: bool = False,
    refresh_every: int = 2,
    interval: tuple[float, float] = (0.0, 1.0),
    can_estimate: bool = True,
    final_steps: int = 0,
) -> str:
    """What to do with the unconditional branch at ``step_index``: COMPUTE, DROP or ESTIMATE.

    * ``"ag"`` (AG): DROP once the truncation test has passed at an earlier step (``truncated``)
      and from ``min_steps`` on; COMPUTE before.
    * ``"linear"`` (LinearAG): like AG after the truncation; before it, the unconditional branch is
      evaluated every ``refresh_every`` steps (the paper alternates: 2) and ESTIMATEd in between, where
      the previous step's predictions exist (``can_estimate``); the first ``min_steps`` always COMPUTE.
    * ``"interval"``: COMPUTE inside the guided interval of the steps, DROP outside it. Without a step
      count (``num_steps`` None) every step COMPUTEs.
    * ``final_steps`` (AG and LinearAG): the last ``final_steps`` steps of a call COMPUTE whatever came
      before (needs ``num_steps``).
    """
    if mode == "interval":
        if num_steps is None:
            return COMPUTE
        lo, hi = interval_bounds(num_steps, interval)
        return COMPUTE if lo <= step_index < hi else DROP
    if step_index < min_steps:
        return COMPUTE
    if final_steps and num_steps is not None and step_index >= num_steps - final_steps:
        return COMPUTE
    if truncated:
        return DROP
    if mode == "linear" and step_index % refresh_every != 0 and can_estimate:
        return ESTIMATE
    return COMPUTE


def linear_ag_estimate(
    coefficients: Sequence[float],
    cond: torch.Tensor,
    cond_prev: torch.Tensor,
    uncond_prev: torch.Tensor,
    latents: torch.Tensor,
) -> torch.Tensor:
    """LinearAG's unconditional estimate, an affine combination of quantities already computed
    (LinearAG, Castillo et al.: "affine transformations of past score estimates"):
    eps_u(t) ~ a * eps_c(t) + b * eps_c(t-1) + c * eps_u(t-1) + d * x_t, one (a, b, c, d) per step.
    x_t enters only where the prediction has the latents' shape (not a learned-variance output such as
    PixArt's, for which the fit sees a zero column and gives d = 0)."""
    a, b, c, d = (float(v) for v in coefficients)
    estimate = cond * a
    if b:
        estimate = estimate + cond_prev.to(cond.dtype) * b
    if c:
        estimate = estimate + uncond_prev.to(cond.dtype) * c
    if d and latents.shape == cond.shape:
        estimate = estimate + latents.to(cond.dtype) * d
    return estimate


def linear_features(
    cond: torch.Tensor, cond_prev: torch.Tensor, uncond_prev: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """The LinearAG regressors of one step as columns of an (elements, 4) float64 matrix (LINEAR_TERMS order);
    the latents column is zero where their shape is not the prediction's (see ``linear_ag_estimate``)."""
    if latents.shape != cond.shape:
        latents = torch.zeros_like(cond)
    return torch.stack([t.detach().reshape(-1).double() for t in (cond, cond_prev, uncond_prev, latents)], dim=1)


def least_squares(gram: torch.Tensor, moment: torch.Tensor, ridge: float = 1e-9) -> tuple[float, ...] | None:
    """Ordinary least squares from the normal equations (X^T X) w = X^T y, with a ridge of ``ridge`` times
    the mean diagonal for regressors that coincide (e.g. latents equal to a prediction). None if not finite."""
    size = gram.shape[0]
    scale = float(torch.diagonal(gram).mean()) or 1.0
    weights = torch.linalg.solve(gram + torch.eye(size, dtype=gram.dtype) * ridge * scale, moment)
    if not bool(torch.isfinite(weights).all()):
        return None
    return tuple(float(w) for w in weights)


def truncation_step(similarities: Sequence[float], threshold: float) -> int | None:
    """The first step whose similarity passes the truncation test (None if none does)."""
    if threshold <= -1.0:
        return -1  # passes before any measurement
    for step, similarity in enumerate(similarities):
        if similarity >= threshold:
            return step
    return None


def planned_actions(
    mode: str,
    num_steps: int,
    *,
    similarities: Sequence[float] = (),
    threshold: float = 2.0,
    min_steps: int = 0,
    refresh_every: int = 2,
    interval: tuple[float, float] = (0.0, 1.0),
    final_steps: int = 0,
) -> list[str]:
    """The action of every step of a call, given the similarity each step would measure where it COMPUTEs
    (e.g. recorded on a plain CFG run): what the hook would do, used to pick a threshold offline."""
    actions: list[str] = []
    truncated = threshold <= -1.0
    for step in range(num_steps):
        action = uncond_action(
            mode,
            step,
            num_steps,
            min_steps=min_steps,
            truncated=truncated,
            refresh_every=refresh_every,
            interval=interval,
            can_estimate=step > 0,
            final_steps=final_steps,
        )
        actions.append(action)
        if action == COMPUTE and step < len(similarities) and crosses(similarities[step], threshold):
            truncated = True
    return actions


def saved_fraction(actions: Sequence[str]) -> float:
    """Share of a CFG call's denoiser evaluations (two per step) that these actions save."""
    if not actions:
        return 0.0
    return sum(action != COMPUTE for action in actions) / (2 * len(actions))
