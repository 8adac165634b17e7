"""Extrapolating calibrators: forecast a skipped span's residual instead of reusing the last one.

TaylorSeer (Liu et al., "From Reusing to Forecasting", arXiv 2503.06923): at each computed step k keep
finite-difference estimates of the residual's derivatives in the step index; on a skipped step k + m
use the Taylor polynomial around k. Steps are counted in scheduler steps, not timesteps, as in the
official code. A cache that reuses residuals (block cache, Δ-DiT) calls ``update`` where it would store
a residual and ``predict`` where it would add the stored one.
"""

from __future__ import annotations

import math

import torch

CALIBRATORS = ("taylorseer",)
MAX_ORDER = 2


def check_calibrator(owner: str, calibrator: str | None, order: int) -> None:
    """Validation shared by the configs that accept a calibrator."""
    if calibrator is not None and calibrator not in CALIBRATORS:
        raise ValueError(f"{owner}.calibrator must be None or one of {list(CALIBRATORS)}, got {calibrator!r}.")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"{owner}.calibrator_order must be an integer from 1 to {MAX_ORDER}, got {order!r}.")


def taylor_update(
    factors: list[torch.Tensor], value: torch.Tensor, gap: int | None, max_order: int
) -> list[torch.Tensor]:
    """TaylorSeer's finite differences: d0 = F_k, d(i+1) = (d_i(k) - d_i(k_prev)) / (k - k_prev).

    ``factors`` are the previous computed step's d0..dn (empty at the first one), ``gap`` = k - k_prev.
    An order appears only once enough computed steps exist to estimate it.
    """
    new = [value]
    if gap is None or gap <= 0:
        return new
    for i in range(min(max_order, len(factors))):
        new.append((new[i] - factors[i]) / gap)
    return new


def taylor_forecast(factors: list[torch.Tensor], distance: int) -> torch.Tensor:
    """F(k + m) ≈ Σ_i d_i · m^i / i! (TaylorSeer, eq. 8), m = ``distance`` steps since the computed step."""
    result = factors[0]
    for i, factor in enumerate(factors[1:], start=1):
        result = result + factor * (distance**i / math.factorial(i))
    return result


class TaylorExtrapolator:
    """Derivative estimates of one tensor (a span's residual for one stream) along the step index."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.step: int | None = None

    def update(self, value: torch.Tensor, step: int) -> None:
        gap = None if self.step is None else step - self.step
        if self.factors and self.factors[0].shape != value.shape:
            self.factors = []
        self.factors = taylor_update(self.factors, value, gap, self.order)
        self.step = step

    def predict(self, step: int) -> torch.Tensor:
        if not self.factors:
            raise RuntimeError("TaylorExtrapolator.predict called before any update")
        return taylor_forecast(self.factors, step - self.step)

    def reset(self) -> None:
        self.factors = []
        self.step = None


class StreamForecast:
    """A span's residual for both streams (hidden, encoder): stored as is, or forecast when calibrated.

    The one place the block cache and Δ-DiT keep, update and read the residual they replay.
    """

    def __init__(self, calibrator: str | None, order: int) -> None:
        self.hidden = None if calibrator is None else TaylorExtrapolator(order)
        self.encoder = None if calibrator is None else TaylorExtrapolator(order)

    def update(self, hidden: torch.Tensor, encoder: torch.Tensor | None, step: int) -> None:
        if self.hidden is not None:
            self.hidden.update(hidden, step)
        if self.encoder is not None:
            if encoder is None:
                self.encoder.reset()
            else:
                self.encoder.update(encoder, step)

    def hidden_at(self, stored: torch.Tensor, step: int) -> torch.Tensor:
        return stored if self.hidden is None else self.hidden.predict(step)

    def encoder_at(self, stored: torch.Tensor, step: int) -> torch.Tensor:
        return stored if self.encoder is None or not self.encoder.factors else self.encoder.predict(step)

    def reset(self) -> None:
        for forecast in (self.hidden, self.encoder):
            if forecast is not None:
                forecast.reset()
