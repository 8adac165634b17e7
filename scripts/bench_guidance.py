"""Adaptive guidance on the reference models: plain CFG against AG, LinearAG and interval guidance.

    python scripts/bench_guidance.py --num 50 --repeats 3           # the reference image model
    python scripts/bench_guidance.py --video --num 20 --repeats 2   # the reference video model

Same pipeline, default steps and guidance, prompts (``scenes.prompt_set``) and seeds (0, 1, ...) for
every row: plain CFG (the baseline); AG at a few fixed thresholds and at the threshold picked for a 25%
saving on held-out tuning runs; LinearAG with coefficients fitted on those runs (threshold picked for a
40% saving) and with the training-free carry-over estimate; guidance in the first half of the steps;
the "fast" cache preset alone and combined with the tuned AG. The tuning runs use their own prompt
stream and seeds (``diffaccel tune guidance``'s), never the evaluation ones.

Per row (through ``diffaccel.eval.bench``, the machinery of ``diffaccel bench``): denoiser evaluations
per call (one per CFG branch evaluated) and the share saved, median wall-clock per call and the speedup
vs the baseline (rows interleaved within each repeat), PSNR vs the baseline's outputs, judge adherence
and its change in points. Prints a Markdown table and writes ``docs/guidance_bench[_video].md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

import diffaccel  # noqa: E402
from diffaccel import AccelConfig, AdaptiveGuidanceConfig, IntervalGuidanceConfig, LinearGuidanceConfig  # noqa: E402
from diffaccel.eval.bench import add_quality, hardware, run_bench  # noqa: E402
from diffaccel.guidance.tune import (  # noqa: E402
    TUNE_PROMPT_SEED,
    TUNE_SEED,
    fit_coefficients,
    pick_threshold,
    record_guidance,
)
from diffaccel.pipelines import reference  # noqa: E402
from diffaccel.pipelines.reference import scenes  # noqa: E402


def tuned_configs(pipe, kind: str, call_kwargs: dict, fit_num: int, ag_target: float, linear_target: float,
                  final_steps: int = 0):
    """AG and LinearAG configs tuned on held-out runs (one recording serves both); with ``final_steps``
    also both re-tuned to the same savings with that many guided last steps."""
    prompts = scenes.prompt_set(fit_num, seed=TUNE_PROMPT_SEED, clip=kind == "video")
    seeds = [TUNE_SEED + i for i in range(fit_num)]
    recording = record_guidance(pipe, prompts, seeds, call_kwargs)
    ag_threshold, ag_saving = pick_threshold(recording, ag_target, AdaptiveGuidanceConfig())
    linear = LinearGuidanceConfig(coefficients=fit_coefficients(recording))
    linear_threshold, linear_saving = pick_threshold(recording, linear_target, linear)
    tuned = {
        "ag": AdaptiveGuidanceConfig(threshold=ag_threshold),
        "linear": linear.replace(threshold=linear_threshold),
        "carry": LinearGuidanceConfig(threshold=linear_threshold),
    }
    if final_steps:
        ag_tail = AdaptiveGuidanceConfig(final_steps=final_steps)
        tail_threshold, tail_saving = pick_threshold(recording, ag_target, ag_tail)
        tuned["ag_tail"] = ag_tail.replace(threshold=tail_threshold)
        linear_tail = linear.replace(final_steps=final_steps)
        linear_tail_threshold, linear_tail_saving = pick_threshold(recording, linear_target, linear_tail)
        tuned["linear_tail"] = linear_tail.replace(threshold=linear_tail_threshold)
    notes = {
        "tuning runs": fit_num,
        "AG threshold for a 25% saving": f"{ag_threshold:.6f} (predicted saving {ag_saving:.1%})",
        "LinearAG threshold for a 40% saving": f"{linear_threshold:.6f} (predicted saving {linear_saving:.1%})",
        **({f"AG threshold for 25% with the last {final_steps} steps guided":
            f"{tail_threshold:.6f} (predicted saving {tail_saving:.1%})",
            f"LinearAG threshold for 40% with the last {final_steps} steps guided":
            f"{linear_tail_threshold:.6f} (predicted saving {linear_tail_saving:.1%})"} if final_steps else {}),
        "mean cosine similarity per step": [round(float(np.mean([r[i] for r in recording.similarities])), 5)
                                            for i in range(recording.num_steps)],
    }
    return tuned, notes


def paired_statistics(results, outputs, prompts, kind: str) -> dict[str, dict[str, float]]:
    """Per row, against the baseline's outputs: the share of outputs left bit-identical, PSNR of the pooled
    MSE (the per-image mean counts an identical image as 100 dB), and the standard error of the paired
    change in adherence (per-prompt differences), so that a gap of a point can be read against its noise."""
    from diffaccel.eval import metrics

    base = outputs[results[0].name].astype(np.float64)
    base_adherence = metrics.judge_adherence(outputs[results[0].name], list(prompts), kind=kind).per_sample
    stats = {}
    for r in results:
        out = outputs[r.name].astype(np.float64)
        per_image = ((out - base) ** 2).reshape(len(out), -1).mean(axis=1)
        pooled = float(per_image.mean())
        diff = metrics.judge_adherence(outputs[r.name], list(prompts), kind=kind).per_sample - base_adherence
        stats[r.name] = {
            "identical": float((per_image == 0).mean()),
            "pooled_psnr": 100.0 if pooled == 0 else float(-10 * np.log10(pooled)),
            "adherence_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
        }
    return stats


def table(results, paired=None) -> list[str]:
    baseline_calls, baseline_blocks = results[0].denoiser_calls, results[0].blocks_computed
    header = ["config", "denoiser evals / call", "saved", "blocks run", "median s / call", "speedup", "PSNR dB",
              "pooled PSNR dB", "identical outputs", "adherence", "Δ adherence (points) ± SE"]
    paired = paired or {}
    base_adherence = results[0].quality.get("adherence")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        saved = 1.0 - r.denoiser_calls / baseline_calls if baseline_calls else 0.0
        psnr = r.quality.get("psnr", float("nan"))
        adherence = r.quality.get("adherence")
        delta = "" if adherence is None or base_adherence is None else f"{100 * (adherence - base_adherence):+.1f}"
        extra = paired.get(r.name, {})
        if delta and r is not results[0] and "adherence_se" in extra:
            delta += f" ± {100 * extra['adherence_se']:.1f}"
        pooled = extra.get("pooled_psnr")
        lines.append("| " + " | ".join([
            r.name,
            f"{r.denoiser_calls:.1f}",
            f"{saved:.0%}",
            f"{r.blocks_computed / baseline_blocks:.0%}" if baseline_blocks else "",
            f"{r.median_seconds:.3f}",
            f"{r.speedup:.2f}x",
            "identical" if psnr >= 100 else f"{psnr:.1f}",
            "" if pooled is None else ("identical" if pooled >= 100 else f"{pooled:.1f}"),
            f"{extra['identical']:.0%}" if "identical" in extra else "",
            "" if adherence is None else f"{100 * adherence:.1f}%",
            delta,
        ]) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", action="store_true", help="the reference video model (default: image)")
    parser.add_argument("--num", type=int, default=50, help="evaluation prompts (seeds 0..num-1)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--fit-num", type=int, default=16, help="held-out tuning runs for the fitted / tuned rows")
    parser.add_argument("--thresholds", default="0.996,0.998,0.999", help="fixed AG thresholds to show")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--final-steps", type=int, default=0,
                        help="also AG and LinearAG re-tuned with this many guided last steps (final_steps)")
    parser.add_argument("--linear-refresh", default="",
                        help="comma-separated k: LinearAG fitted, never truncated, evaluating the unconditional branch "
                        "every k-th step and estimating it on the others")
    parser.add_argument("--rows", default=None,
                        help="comma-separated substrings: keep only the rows whose name contains one (and the baseline)")
    parser.add_argument("--out", default=None, help="Markdown output (default docs/guidance_bench[_video].md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    kind = "video" if args.video else "image"
    pipe = reference.load(kind)
    call_kwargs = reference.call_defaults(kind)
    prompts = scenes.prompt_set(args.num, clip=args.video)
    tuned, notes = tuned_configs(pipe, kind, call_kwargs, args.fit_num, ag_target=0.25, linear_target=0.40,
                                 final_steps=args.final_steps)
    fast = diffaccel.preset("fast")

    configs = [("CFG (baseline)", AccelConfig())]
    for value in (float(v) for v in args.thresholds.split(",") if v):
        configs.append((f"AG γ={value:g}", AccelConfig(guidance=AdaptiveGuidanceConfig(threshold=value))))
    configs += [
        (f"AG γ={tuned['ag'].threshold:.5f} (tuned 25%)", AccelConfig(guidance=tuned["ag"])),
        (f"LinearAG fitted, γ={tuned['linear'].threshold:.5f}", AccelConfig(guidance=tuned["linear"])),
        (f"LinearAG carry-over, γ={tuned['carry'].threshold:.5f}", AccelConfig(guidance=tuned["carry"])),
        ("LinearAG fitted, no truncation (estimates alternate steps)",
         AccelConfig(guidance=tuned["linear"].replace(threshold=2.0))),
        ("interval [0, 0.5)", AccelConfig(guidance=IntervalGuidanceConfig())),
        ("fast (block cache)", fast),
        ("fast + AG tuned", fast.with_methods(guidance=tuned["ag"])),
    ]
    if args.final_steps:
        k = args.final_steps
        configs += [
            (f"AG γ={tuned['ag_tail'].threshold:.5f} (tuned 25%), last {k} guided", AccelConfig(guidance=tuned["ag_tail"])),
            (f"LinearAG fitted, γ={tuned['linear_tail'].threshold:.5f}, last {k} guided",
             AccelConfig(guidance=tuned["linear_tail"])),
            (f"fast + AG tuned, last {k} guided", fast.with_methods(guidance=tuned["ag_tail"])),
        ]
    for k in (int(v) for v in args.linear_refresh.split(",") if v):
        configs.append((f"LinearAG fitted, no truncation, uncond every {k} steps",
                        AccelConfig(guidance=tuned["linear"].replace(threshold=2.0, refresh_every=k))))
        configs.append((f"fast + LinearAG fitted, no truncation, uncond every {k} steps",
                        fast.with_methods(guidance=tuned["linear"].replace(threshold=2.0, refresh_every=k))))
    if args.rows:
        keep = [key for key in args.rows.split(",") if key]
        configs = configs[:1] + [c for c in configs[1:] if any(key in c[0] for key in keep)]
    start = time.perf_counter()
    results, outputs = run_bench(pipe, configs, prompts, call_kwargs, repeats=args.repeats, seed=0, progress=False)
    add_quality(results, outputs, prompts, judge_kind=kind)
    paired = paired_statistics(results, outputs, prompts, kind)
    seconds = time.perf_counter() - start

    lines = [
        f"# Adaptive guidance on the reference {kind} model",
        "",
        f"`python scripts/bench_guidance.py{' --video' if args.video else ''} --num {args.num} --repeats {args.repeats} "
        f"--fit-num {args.fit_num} --thresholds {args.thresholds} --threads {args.threads}"
        f"{f' --final-steps {args.final_steps}' if args.final_steps else ''}"
        f"{f' --linear-refresh {args.linear_refresh}' if args.linear_refresh else ''}"
        f"{f' --rows {args.rows}' if args.rows else ''}`; "
        f"{time.strftime('%Y-%m-%d')}, {hardware()}, {seconds:.0f} s.",
        "",
        f"{args.num} prompts (`scenes.prompt_set`), seeds 0-{args.num - 1}, call {json.dumps(call_kwargs)}. "
        "Denoiser evaluations count one per CFG branch evaluated; saved = share of the baseline's; blocks run = "
        "transformer blocks computed as a share of the baseline's (guidance and caching compound there). Speedup = "
        "baseline median / row median, wall-clock per call on this machine (rows interleaved per repeat). "
        "PSNR vs the baseline's outputs (same seeds): mean of per-image PSNR (an identical image counts 100 dB) "
        "and PSNR of the pooled MSE; identical outputs = share left bit-identical. Adherence = shipped judge, "
        "change in points vs the baseline ± the standard error of the per-prompt paired differences.",
        "",
        *table(results, paired),
        "",
        "Tuning (held-out prompts and seeds, plain CFG runs):",
        "",
        *[f"- {key}: {value}" for key, value in notes.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or ROOT / "docs" / f"guidance_bench{'_video' if args.video else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
