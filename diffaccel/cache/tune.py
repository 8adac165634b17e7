"""Find a cache config for a model that meets a target: PSNR to the uncached output, or a speedup.

Users should not tune thresholds by reading percentiles by hand (a frequent complaint about the
peers). ``tune_cache`` runs the model on held-out prompts: once uncached (the reference), then a
search over the method's one speed knob — the block cache's and TeaCache's threshold (bisection),
Δ-DiT's interval and span (a small grid), the learned schedule's compute budget (re-thresholding the
trained router), the number of steps a fixed TeaCache schedule computes (then which steps: a hill climb)
— and returns the fastest setting whose mean PSNR to the reference meets the target,
or the setting whose share of computed blocks is closest to 1/target speedup. Speed during the
search is the share of block evaluations (deterministic); wall-clock is for ``diffaccel bench``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .block_cache import BlockCacheConfig
from .delta_dit import DeltaDiTConfig
from .learned import schedule_for_budget, train_schedule
from .teacache import TeaCacheConfig, calibrate_teacache_experts

logger = logging.getLogger("diffaccel")

METHODS = ("block", "teacache", "delta_dit", "learned", "schedule")
# What ``--method auto`` tries: the schedule search runs the held-out calls some hundred times, so it is asked for.
AUTO_METHODS = ("block", "teacache", "delta_dit", "learned")
# The fixed-schedule TeaCache the "schedule" method searches: the prediction forecast (first-order Taylor) on
# skipped steps, as diffusers' TaylorSeer lite mode, whose every-N-th plan is where the climb can start.
SCHEDULED_TEACACHE = TeaCacheConfig(reuse="output", calibrator="taylorseer")


@dataclass
class Trial:
    config: Any
    psnr: float
    compute_fraction: float  # blocks computed / blocks of an uncached run


@dataclass
class TuneResult:
    config: Any
    psnr: float
    compute_fraction: float
    trials: list[Trial] = field(default_factory=list)

    @property
    def block_speedup(self) -> float:
        return 1.0 / max(self.compute_fraction, 1e-9)


def _psnr(reference: np.ndarray, sample: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - sample.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(1.0 / mse))


class _Evaluator:
    """Runs the held-out calls under a config; mean PSNR to the uncached outputs and compute share."""

    def __init__(self, pipe: Any, calls: Sequence[dict]) -> None:
        import diffaccel

        self.diffaccel = diffaccel
        self.pipe = pipe
        self.calls = list(calls)
        diffaccel.remove(pipe)
        self.reference = [self._run(call) for call in self.calls]
        self.trials: list[Trial] = []

    def _run(self, call: dict) -> np.ndarray:
        kwargs = {k: v for k, v in call.items() if k not in ("seed", "generator", "output_type")}
        out = self.pipe(generator=torch.Generator("cpu").manual_seed(call.get("seed", 0)), output_type="np", **kwargs)
        return np.asarray(out.frames if hasattr(out, "frames") else out.images)

    def __call__(self, config: Any) -> Trial:
        self.diffaccel.accelerate(self.pipe, cache=config)
        computed = total = 0
        scores = []
        try:
            for call, reference in zip(self.calls, self.reference):
                scores.append(_psnr(reference, self._run(call)))
                stats = self.diffaccel.stats(self.pipe)
                computed += stats["blocks_computed"]
                total += stats["blocks_computed"] + stats["blocks_skipped"]
        finally:
            self.diffaccel.remove(self.pipe)
        trial = Trial(config, float(np.mean(scores)), computed / max(total, 1))
        self.trials.append(trial)
        logger.info("tune: %s -> PSNR %.2f dB, computes %.2f of blocks", config, trial.psnr, trial.compute_fraction)
        return trial


def _pick(trials: Sequence[Trial], target_psnr: float | None, target_speedup: float | None) -> Trial:
    if target_psnr is not None:
        meeting = [t for t in trials if t.psnr >= target_psnr]
        if not meeting:
            return max(trials, key=lambda t: t.psnr)
        return min(meeting, key=lambda t: (t.compute_fraction, -t.psnr))
    goal = 1.0 / target_speedup
    return min(trials, key=lambda t: (abs(t.compute_fraction - goal), -t.psnr))


def _bisect(evaluate: Callable[[float], Trial], low: float, high: float, target_psnr, target_speedup, rounds: int) -> None:
    """Bisection on a knob where larger is faster and less faithful."""
    for _ in range(rounds):
        middle = (low + high) / 2
        trial = evaluate(middle)
        if target_psnr is not None:
            ok = trial.psnr >= target_psnr
        else:
            ok = trial.compute_fraction >= 1.0 / target_speedup
        low, high = (middle, high) if ok else (low, middle)


def spread_schedule(steps: int, computes: int, warmup: int = 3) -> str:
    """A fixed plan of ``computes`` of ``steps`` steps: the first ``warmup`` compute, the rest spread evenly."""
    if not 1 <= computes <= steps:
        raise ValueError(f"a schedule of {steps} steps computes between 1 and {steps} of them, got {computes}.")
    warmup = min(warmup, computes)
    rest, window = computes - warmup, steps - warmup
    plan = ["1"] * warmup + ["0"] * window
    for i in range(rest):
        plan[warmup + int((i + 0.5) * window / rest)] = "1"
    return "".join(plan)


def _neighbours(schedule: str) -> list[str]:
    """Every plan with one computed step (not the first) moved to an adjacent skipped step."""
    out = []
    for i, c in enumerate(schedule):
        if c != "1" or i == 0:
            continue
        for j in (i - 1, i + 1):
            if 0 < j < len(schedule) and schedule[j] == "0":
                plan = list(schedule)
                plan[i], plan[j] = "0", "1"
                out.append("".join(plan))
    return out


def climb_schedule(evaluate: Callable[[Any], Trial], schedule: str, base: TeaCacheConfig = SCHEDULED_TEACACHE,
                   sweeps: int = 8, say: Callable[[str], None] = lambda message: None) -> Trial:
    """Steepest-ascent hill climb on which steps compute, the count fixed: each sweep tries every move of one
    computed step to a neighbouring skipped one and keeps the best if it raises the mean PSNR."""
    best = evaluate(dataclasses.replace(base, schedule=schedule))
    for sweep in range(sweeps):
        trials = [evaluate(dataclasses.replace(base, schedule=plan)) for plan in _neighbours(best.config.schedule)]
        top = max(trials, key=lambda t: t.psnr, default=None)
        if top is None or top.psnr <= best.psnr + 1e-3:
            break
        say(f"sweep {sweep + 1}: {best.config.schedule} {best.psnr:.2f} dB -> {top.config.schedule} {top.psnr:.2f} dB")
        best = top
    return best


def search_teacache_schedule(pipe: Any, calls: Sequence[dict], start: str, base: TeaCacheConfig = SCHEDULED_TEACACHE,
                             sweeps: int = 8, say: Callable[[str], None] = lambda message: None) -> Trial:
    """The best plan with as many computed steps as ``start``, found by ``climb_schedule`` from it on ``calls``
    (pipe kwargs with a ``seed`` each), scored by the mean PSNR to their uncached outputs."""
    return climb_schedule(_Evaluator(pipe, calls), start, base, sweeps=sweeps, say=say)


def tune_cache(
    pipe: Any,
    calls: Sequence[dict],
    method: str = "block",
    *,
    target_psnr: float | None = None,
    target_speedup: float | None = None,
    calibration_calls: Sequence[dict] = (),
    rounds: int = 6,
    learned_iterations: int = 40,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search ``method``'s speed knob on ``calls`` (pipe kwargs with a ``seed`` each) for a target.

    Exactly one of ``target_psnr`` (dB, mean over the calls, vs the uncached outputs) and
    ``target_speedup`` (x, as 1 / share of computed blocks) must be given. ``calibration_calls`` feed
    TeaCache's polynomial fit and the learned router's training (default: the tuning calls).
    """
    if (target_psnr is None) == (target_speedup is None):
        raise ValueError("tune_cache needs exactly one of target_psnr and target_speedup.")
    if target_speedup is not None and target_speedup <= 1.0:
        raise ValueError(f"target_speedup must be above 1, got {target_speedup}.")
    if method not in METHODS:
        raise ValueError(f"tune_cache: unknown method {method!r}; choose from {list(METHODS)}.")
    if not calls:
        raise ValueError("tune_cache needs at least one held-out call.")
    say = progress or (lambda message: None)
    calibration = list(calibration_calls) or list(calls)
    evaluate = _Evaluator(pipe, calls)

    if method == "block":
        for calibrator in (None, "taylorseer"):
            say(f"block cache, calibrator={calibrator}: bisection on the threshold")
            _bisect(lambda x, c=calibrator: evaluate(BlockCacheConfig(threshold=x, max_consecutive=None, calibrator=c)),
                    0.0, 1.0, target_psnr, target_speedup, rounds)
    elif method == "teacache":
        say("TeaCache: fitting the rescaling polynomial on the calibration calls")
        runs = [dict({k: v for k, v in c.items() if k != "seed"}, generator=torch.Generator().manual_seed(c.get("seed", 0)))
                for c in calibration]
        coefficients, experts = calibrate_teacache_experts(pipe, runs)  # one polynomial per expert denoiser
        say("TeaCache: bisection on the threshold")
        _bisect(lambda x: evaluate(TeaCacheConfig(threshold=x, coefficients=coefficients, expert_coefficients=experts)),
                0.0, 2.0, target_psnr, target_speedup, rounds)
    elif method == "delta_dit":
        denoiser = pipe.transformer
        from diffaccel.pipelines import adapter_for

        blocks = len(adapter_for(denoiser).find_blocks(denoiser))
        for interval in (2, 3, 4):
            for span in sorted({max(1, blocks // 4), max(1, blocks // 3), max(1, blocks // 2)}):
                say(f"Δ-DiT: interval {interval}, {span} cached blocks")
                evaluate(DeltaDiTConfig(cache_interval=interval, cached_blocks=span))
    elif method == "schedule":
        steps = int(calls[0].get("num_inference_steps") or 0)
        if steps < 2:
            raise ValueError("tune_cache method 'schedule' needs num_inference_steps (at least 2) in the calls.")
        if target_speedup is not None:
            counts = [max(1, min(steps, round(steps / target_speedup)))]
        else:  # the fewest computes whose spread plan meets the target, then one fewer with a better placement
            low, high = 1, steps
            while low < high:
                middle = (low + high) // 2
                if evaluate(dataclasses.replace(SCHEDULED_TEACACHE, schedule=spread_schedule(steps, middle))).psnr >= target_psnr:
                    high = middle
                else:
                    low = middle + 1
            counts = sorted({low, max(1, low - 1)})
        # A climb on a few prompts can overfit (docs/cache_bench_video_20_schedule10.md): where calibration
        # calls of their own are given, the climbed plan is kept only if it also beats its start plan on them.
        validate = _Evaluator(pipe, calibration_calls) if calibration_calls else None
        for count in counts:
            start = spread_schedule(steps, count)
            say(f"fixed TeaCache schedule: which {count} of {steps} steps compute (hill climb from the spread plan)")
            best = climb_schedule(evaluate, start, say=lambda m: say(f"  {m}"))
            if validate is None or best.config.schedule == start:
                continue
            climbed, kept = validate(best.config).psnr, validate(dataclasses.replace(SCHEDULED_TEACACHE, schedule=start)).psnr
            chosen = best.config.schedule if climbed >= kept else start
            say(f"  on the calibration prompts: climbed {climbed:.2f} dB, start {kept:.2f} dB: keeping the "
                f"{'climbed' if chosen != start else 'start'} plan")
            evaluate.trials = [t for t in evaluate.trials if getattr(t.config, "schedule", "").count("1") != count
                               or t.config.schedule == chosen]
    else:
        say(f"learned schedule: training the router ({learned_iterations} iterations)")
        _, router = train_schedule(pipe, calibration, iterations=learned_iterations,
                                   progress=lambda m: say(f"  router {m}"))
        label = f"{type(pipe.transformer).__name__}, {calibration[0]['num_inference_steps']} steps"
        _bisect(lambda x: evaluate(schedule_for_budget(router, 1.0 - x, trained_for=label)), 0.0, 0.95,
                target_psnr, target_speedup, rounds)
    best = _pick(evaluate.trials, target_psnr, target_speedup)
    if target_psnr is not None and best.psnr < target_psnr:
        logger.warning("tune: no %s setting reached %.1f dB; the most faithful one gives %.2f dB", method, target_psnr, best.psnr)
    return TuneResult(best.config, best.psnr, best.compute_fraction, evaluate.trials)


def tune_cache_command(args) -> int:
    """``diffaccel tune cache``: search on held-out prompts, write an AccelConfig file with the result."""
    import json
    from pathlib import Path

    from diffaccel.config import AccelConfig
    from diffaccel.guidance.tune import TUNE_PROMPT_SEED
    from diffaccel.loading import load_model, read_prompts
    from diffaccel.pipelines.reference import scenes

    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--out {args.out!r}: use a .json, .yaml or .yml file name.")
    if (args.target_psnr is None) == (args.target_speedup is None):
        raise ValueError("diffaccel tune cache needs exactly one of --target-psnr and --target-speedup.")
    loaded = load_model(args.model, args.device, args.dtype, video=args.video)
    num = args.num or 4
    if args.prompts or args.prompt_set:
        prompts = read_prompts(args.prompts, args.prompt_set, 2 * num)
    else:  # reference scenes from a stream the evaluation sets do not use
        prompts = scenes.prompt_set(2 * num, seed=TUNE_PROMPT_SEED, clip=loaded.is_video)
    kwargs = dict(loaded.defaults)
    for name, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)):
        if value is not None:
            kwargs[name] = value
    calls = [dict(kwargs, prompt=p, seed=args.seed + i) for i, p in enumerate(prompts)]
    methods = list(AUTO_METHODS) if args.method == "auto" else [args.method]
    results = {}
    for method in methods:
        print(f"tuning {method} ...", flush=True)
        results[method] = tune_cache(
            loaded.pipe, calls[:num], method, target_psnr=args.target_psnr, target_speedup=args.target_speedup,
            calibration_calls=calls[num:], progress=lambda message: print(f"  {message}", flush=True),
        )
    if args.target_psnr is not None:
        meeting = {m: r for m, r in results.items() if r.psnr >= args.target_psnr} or results
        method, best = min(meeting.items(), key=lambda item: item[1].compute_fraction)
    else:
        method, best = max(results.items(), key=lambda item: item[1].psnr)
    AccelConfig(cache=best.config).to_file(out)
    report = {m: {"config": r.config.to_dict(), "psnr": round(r.psnr, 2), "compute_fraction": round(r.compute_fraction, 3)}
              for m, r in results.items()}
    print(json.dumps({"model": loaded.name, "call": kwargs, "held_out_prompts": num, "results": report}, indent=2))
    print(f"wrote {out}: cache={method!r}, PSNR {best.psnr:.2f} dB on the held-out prompts, "
          f"computes {best.compute_fraction:.2f} of blocks (~{best.block_speedup:.2f}x fewer block evaluations)")
    return 0
