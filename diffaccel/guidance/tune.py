"""Fit LinearAG's coefficients, and pick AG's threshold for a target saving, from plain CFG runs.

LinearAG (Castillo et al., arXiv 2312.12487) regresses the unconditional prediction of each step on
quantities already computed, by ordinary least squares over a few baseline trajectories. Here the
regressors of step ``t`` are ``eps_c(t), eps_c(t-1), eps_u(t-1), x_t`` (``rules.LINEAR_TERMS``), one
coefficient row per step of the schedule: the runs are recorded with plain CFG (adaptive guidance
installed with a threshold above 1, so nothing is skipped) and the normal equations are accumulated
step by step, so no trajectory is kept in memory.

    config = fit_linear_guidance(pipe, prompts, seeds, dict(num_inference_steps=20, guidance_scale=4.0))
    diffaccel.accelerate(pipe, guidance=config)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from diffaccel.config import AccelConfig

from .adaptive import GUIDANCE_HOOK, AdaptiveGuidanceConfig, LinearGuidanceConfig
from .rules import (
    CARRY_GUIDANCE,
    LINEAR_TERMS,
    cosine_similarity,
    least_squares,
    linear_features,
    planned_actions,
    saved_fraction,
)

logger = logging.getLogger("diffaccel")

TUNE_PROMPT_SEED = 4321  # prompt stream of `diffaccel tune` on the reference sets (evaluation uses 1234)
TUNE_SEED = 10_000  # first noise seed of the tuning runs (evaluation uses 0, 1, ...)
RECORD = AdaptiveGuidanceConfig(threshold=2.0)  # never skips: plain CFG, bit for bit


@dataclass
class GuidanceRecording:
    """Normal equations per step and the similarities of every run, from plain CFG trajectories."""

    gram: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> X^T X (4 x 4, float64)
    moment: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> X^T y
    energy: dict[int, float] = field(default_factory=dict)  # step -> y^T y
    similarities: list[list[float]] = field(default_factory=list)  # run -> per-step cosine similarity
    num_steps: int | None = None

    def relative_error(self, step: int, row: Sequence[float]) -> float:
        """||X w - y|| / ||y|| of a coefficient row at ``step``, from the accumulated sums."""
        w = torch.tensor(row, dtype=torch.float64)
        residual = self.energy[step] - 2 * float(w @ self.moment[step]) + float(w @ self.gram[step] @ w)
        return math.sqrt(max(residual, 0.0) / self.energy[step]) if self.energy[step] > 0 else 0.0


def record_guidance(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], call_kwargs: dict) -> GuidanceRecording:
    """Run ``pipe`` with plain CFG on each prompt/seed and accumulate what fitting needs.

    The pipeline's own acceleration, if any, is put back afterwards.
    """
    import diffaccel
    from diffaccel.api import find_denoiser
    from diffaccel.runtime import PIPE_ATTRIBUTE

    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"Give as many seeds as prompts (at least one); got {len(prompts)} prompts and {len(seeds)} seeds.")
    previous = getattr(pipe, PIPE_ATTRIBUTE, None)
    previous_config = previous.config if previous is not None else None
    recording = GuidanceRecording()
    run_state: dict[str, Any] = {}

    def observe(step: int, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        run_state["steps"] = max(run_state.get("steps", 0), step + 1)
        run_state["similarities"][step] = cosine_similarity(cond, uncond)
        last = run_state.get("last")
        if last is not None and last[0] == step - 1 and last[1].shape == cond.shape:
            features = linear_features(cond, last[1], last[2], latents)
            target = uncond.detach().reshape(-1).double()
            recording.gram[step] = recording.gram.get(step, 0) + features.T @ features
            recording.moment[step] = recording.moment.get(step, 0) + features.T @ target
            recording.energy[step] = recording.energy.get(step, 0.0) + float(target @ target)
        run_state["last"] = (step, cond.detach(), uncond.detach())

    diffaccel.accelerate(pipe, AccelConfig(guidance=RECORD))
    try:
        hook = find_denoiser(pipe)._diffusers_hook.get_hook(GUIDANCE_HOOK)
        hook.observers.append(observe)
        kwargs = dict(call_kwargs)
        kwargs.setdefault("output_type", "latent")  # the decoder plays no part in the fit
        for prompt, seed in zip(prompts, seeds):
            run_state.clear()
            run_state["similarities"] = {}
            with torch.no_grad():
                pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
            steps = run_state.get("steps", 0)
            if steps == 0:
                raise ValueError(
                    "tune guidance: the pipeline evaluated no step with both CFG branches; run it with guidance "
                    "on (guidance_scale / true_cfg_scale above 1, with a negative prompt where the pipeline needs one)."
                )
            if recording.num_steps not in (None, steps):
                raise ValueError(f"tune guidance: the runs have different step counts ({recording.num_steps} and {steps}).")
            recording.num_steps = steps
            recording.similarities.append([run_state["similarities"].get(i, float("nan")) for i in range(steps)])
    finally:
        if previous_config is not None:
            diffaccel.accelerate(pipe, previous_config)
        else:
            diffaccel.remove(pipe)
    return recording


def fit_coefficients(recording: GuidanceRecording) -> tuple[tuple[float, ...], ...]:
    """One least-squares row per step (step 0, which has no previous step, keeps the carry-over row)."""
    rows = []
    for step in range(recording.num_steps or 0):
        row = None
        if step in recording.gram:
            row = least_squares(recording.gram[step], recording.moment[step])
        if row is None:
            if step > 0:
                logger.warning("diffaccel: LinearAG fit at step %d is degenerate; using (1, -1, 1, 0) there", step)
            row = CARRY_GUIDANCE
        rows.append(tuple(row))
    return tuple(rows)


def planned_saving(recording: GuidanceRecording, config: AdaptiveGuidanceConfig, **changes: Any) -> float:
    """Mean share of evaluations ``config`` (with ``changes``) would save on the recorded runs."""
    config = config.replace(**changes)
    return sum(
        saved_fraction(planned_actions(config.mode, len(run), similarities=run, threshold=config.threshold,
                                       min_steps=config.min_steps, refresh_every=config.refresh_every,
                                       final_steps=config.final_steps))
        for run in recording.similarities
    ) / max(len(recording.similarities), 1)


def pick_threshold(
    recording: GuidanceRecording, target_saving: float, config: AdaptiveGuidanceConfig
) -> tuple[float, float]:
    """The highest threshold whose planned actions save at least ``target_saving`` of the denoiser
    evaluations on the recorded runs (mean over runs); (threshold, saving). If no threshold reaches the
    target, the one that saves most. The similarities come from plain CFG runs, so this is a prediction."""
    if not 0.0 < target_saving < 1.0:
        raise ValueError(f"target_saving must be a fraction between 0 and 1, got {target_saving!r}.")
    candidates = sorted({s for run in recording.similarities for s in run if s == s}, reverse=True)
    best = (2.0, planned_saving(recording, config, threshold=2.0))
    for threshold in candidates:
        value = planned_saving(recording, config, threshold=threshold)
        if value >= target_saving:
            return threshold, value
        if value > best[1]:
            best = (threshold, value)
    logger.warning(
        "diffaccel: no threshold saves %.0f%% of the evaluations on the tuning runs; the best saves %.1f%%",
        100 * target_saving,
        100 * best[1],
    )
    return best


def pick_refresh(
    recording: GuidanceRecording, target_saving: float, config: AdaptiveGuidanceConfig
) -> tuple[int, float]:
    """LinearAG that keeps guidance to the end (threshold above 1: never truncated): the smallest
    ``refresh_every`` whose planned estimates save at least ``target_saving`` of the evaluations (mean over
    the recorded runs); (refresh_every, saving). The longest interval if none reaches it."""
    if not 0.0 < target_saving < 1.0:
        raise ValueError(f"target_saving must be a fraction between 0 and 1, got {target_saving!r}.")
    steps = recording.num_steps or 0
    best = (1, 0.0)
    for k in range(2, max(steps, 2) + 1):
        best = (k, planned_saving(recording, config, refresh_every=k))
        if best[1] >= target_saving:
            return best
    logger.warning("diffaccel: no refresh interval saves %.0f%% of the evaluations; the longest saves %.1f%%",
                   100 * target_saving, 100 * best[1])
    return best


def fit_linear_guidance(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: dict,
    *,
    base: AdaptiveGuidanceConfig | None = None,
    target_saving: float | None = None,
    return_report: bool = False,
):
    """Fit LinearAG's per-step coefficients on plain CFG runs of ``pipe`` (one per prompt/seed, called
    with ``call_kwargs``) and return ``base`` (default ``LinearGuidanceConfig()``) with them; with
    ``target_saving``, the threshold is also picked (see ``pick_threshold``). A ``base`` in mode "ag"
    only gets its threshold picked. ``return_report=True`` returns ``(config, report)``, the report
    giving per-step fit errors next to those of the training-free estimate."""
    base = base if base is not None else LinearGuidanceConfig()
    if base.mode == "interval":
        raise ValueError("fit_linear_guidance tunes mode 'linear' (coefficients, threshold) or 'ag' (threshold).")
    if base.mode == "ag" and target_saving is None:
        raise ValueError("For mode 'ag' there are no coefficients to fit; give target_saving to pick the threshold.")
    recording = record_guidance(pipe, prompts, seeds, call_kwargs)
    changes: dict[str, Any] = {}
    report: dict[str, Any] = {"runs": len(prompts), "num_steps": recording.num_steps}
    if base.mode == "linear":
        rows = fit_coefficients(recording)
        changes["coefficients"] = rows
        report["terms"] = list(LINEAR_TERMS)
        report["fit_relative_error"] = {s: round(recording.relative_error(s, rows[s]), 5) for s in sorted(recording.gram)}
        report["carry_relative_error"] = {
            s: round(recording.relative_error(s, CARRY_GUIDANCE), 5) for s in sorted(recording.gram)
        }
    if target_saving is not None and base.mode == "linear" and base.threshold > 1.0:
        refresh, saving = pick_refresh(recording, target_saving, base.replace(**changes))
        changes["refresh_every"] = refresh
        report["predicted_saving"] = round(saving, 4)
    elif target_saving is not None:
        threshold, saving = pick_threshold(recording, target_saving, base.replace(**changes))
        changes["threshold"] = threshold
        report["predicted_saving"] = round(saving, 4)
    steps = recording.num_steps or 0
    report["mean_similarity"] = [
        round(sum(run[i] for run in recording.similarities) / len(recording.similarities), 6) for i in range(steps)
    ]
    config = base.replace(**changes)
    return (config, report) if return_report else config


# ------------------------------------------------------------------------------------------ CLI


def tune_guidance_command(args) -> int:
    """``diffaccel tune guidance``: fit on the model, write an AccelConfig file with the result."""
    import json
    from pathlib import Path

    from diffaccel.loading import load_model, read_prompts
    from diffaccel.pipelines.reference import scenes

    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--out {args.out!r}: use a .json, .yaml or .yml file name.")
    loaded = load_model(args.model, args.device, args.dtype, video=args.video)
    num = args.num or 16
    if args.prompts or args.prompt_set:
        prompts = read_prompts(args.prompts, args.prompt_set, num)
    else:  # the reference scenes, from a stream the evaluation sets do not use
        prompts = scenes.prompt_set(num, seed=TUNE_PROMPT_SEED, clip=loaded.is_video)
    seeds = [args.seed + i for i in range(len(prompts))]
    kwargs = dict(loaded.defaults)
    for name, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)):
        if value is not None:
            kwargs[name] = value
    base_cls = LinearGuidanceConfig if args.mode == "linear" else AdaptiveGuidanceConfig
    overrides = {k: v for k, v in (("threshold", args.threshold), ("min_steps", args.min_steps),
                                   ("final_steps", args.final_steps), ("refresh_every", args.refresh_every))
                 if v is not None}
    base = base_cls(**overrides)
    config, report = fit_linear_guidance(
        loaded.pipe, prompts, seeds, kwargs, base=base, target_saving=args.target_saving, return_report=True
    )
    AccelConfig(guidance=config).to_file(out)
    print(json.dumps({"model": loaded.name, "call": kwargs, **report}, indent=2))
    print(f"wrote {out}: guidance={config.method!r}, threshold {config.threshold}, "
          f"{len(config.coefficients)} coefficient rows")
    return 0
