"""Bottleneck sampling on the reference models at their larger training resolution.

    python scripts/bench_bottleneck.py --num 500 --repeats 1          # image model, 128 px
    python scripts/bench_bottleneck.py --video --num 50
    python scripts/bench_bottleneck.py --num 48 --stage-steps 2,12,2 --combined docs/configs/turbo_cache_ag.yaml \
        --rows counts --out docs/bottleneck_bench_counts.md   # step counts per stage, equal-step control

Same prompts (``scenes.prompt_set``), seeds and steps for every row: full-resolution sampling (the
baseline), bottleneck sampling at its defaults and at two other stage splits, and bottleneck + the
block cache. ``--stage-steps N1,N2,N3`` adds a row with those step counts per stage (the paper's form),
its equal-step control (full resolution at N1+N2+N3 steps) and, with ``--combined CONFIG``, the row
combined with that config's cache and guidance. Per row (``diffaccel.eval.bench``): median seconds per call and speedup (rows interleaved
per repeat), denoiser calls, PSNR vs the baseline, judge adherence, and for images judge-feature FID
against procedural ground truth at the same resolution once there are ``--fid-min`` samples.
Writes ``docs/bottleneck_bench[_video].md``.
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

from diffaccel import AccelConfig, BlockCacheConfig, BottleneckConfig  # noqa: E402
from diffaccel.eval.bench import add_quality, hardware, run_bench  # noqa: E402
from diffaccel.pipelines import reference  # noqa: E402
from diffaccel.pipelines.reference import scenes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", action="store_true")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="default: the largest training resolution")
    parser.add_argument("--fid-min", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage-steps", action="append", default=[], help="N1,N2,N3: a row with these step counts")
    parser.add_argument("--combined", default=None, help="an AccelConfig file whose cache and guidance join each "
                        "--stage-steps row in one more row")
    parser.add_argument("--rows", choices=["all", "counts"], default="all",
                        help="counts: only the baseline and the --stage-steps rows")
    parser.add_argument("--no-controls", action="store_true",
                        help="leave out the equal-step controls of the --stage-steps rows (long FID runs)")
    parser.add_argument("--out", default=None, help="default docs/bottleneck_bench[_video].md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kind = "video" if args.video else "image"
    pipe = reference.load(kind)
    call = reference.call_defaults(kind)
    resolution = args.resolution or max(reference.info(kind)["train_resolutions"])
    call["height"] = call["width"] = resolution
    prompts = scenes.prompt_set(args.num, clip=args.video)
    configs = [
        ("full resolution (baseline)", AccelConfig()),
        ("bottleneck 1/0.5/1, 20/55/25%", AccelConfig(sampling=BottleneckConfig())),
        ("bottleneck 1/0.5/1, 15/65/20%", AccelConfig(sampling=BottleneckConfig(step_fractions=(0.15, 0.65, 0.2)))),
        ("bottleneck 1/0.5/1, 25/45/30%", AccelConfig(sampling=BottleneckConfig(step_fractions=(0.25, 0.45, 0.3)))),
        ("bottleneck + block cache", AccelConfig(sampling=BottleneckConfig(), cache=BlockCacheConfig(threshold=0.15))),
    ]
    if args.rows == "counts":
        configs = configs[:1]
    combined = AccelConfig.from_file(args.combined) if args.combined else None
    for text in args.stage_steps:
        counts = tuple(int(n) for n in text.split(","))
        if len(counts) != 3:
            parser.error(f"--stage-steps {text!r}: give three counts, N1,N2,N3 (full, half, full resolution)")
        label = "/".join(map(str, counts))
        sampling = BottleneckConfig(stage_steps=counts)
        configs.append((f"bottleneck {label} steps", AccelConfig(sampling=sampling)))
        if not args.no_controls:
            configs.append((f"full resolution, {sum(counts)} steps (equal-step control)", AccelConfig(),
                            {"num_inference_steps": sum(counts)}))
        if combined is not None:
            configs.append((f"bottleneck {label} steps + {Path(args.combined).stem}",
                            combined.with_methods(sampling=sampling)))
    start = time.perf_counter()
    results, outputs = run_bench(pipe, configs, prompts, call, repeats=args.repeats, seed=0, progress=False)
    real = None
    if not args.video and args.num >= args.fid_min:
        real, _, _ = scenes.sample_batch(np.random.default_rng(2_000_000), args.num, resolution)
    add_quality(results, outputs, prompts, judge_kind=kind, real=real, fid_min_samples=args.fid_min)
    seconds = time.perf_counter() - start
    keys = sorted({k for r in results for k, v in r.quality.items() if isinstance(v, (int, float))})
    lines = [
        f"# Bottleneck sampling on the reference {kind} model at {resolution} px",
        "",
        f"`python scripts/bench_bottleneck.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{time.strftime('%Y-%m-%d')}, {hardware()}, {seconds:.0f} s. Call {json.dumps(call)}; seeds 0-{args.num - 1}.",
        "",
        "| config | median s / call | speedup | denoiser calls | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for r in results:
        values = [f"{r.quality[k]:.4g}" if isinstance(r.quality.get(k), (int, float)) else "" for k in keys]
        lines.append(f"| {r.name} | {r.median_seconds:.3f} | {r.speedup:.2f}x | {r.denoiser_calls:.0f} | " + " | ".join(values) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else ROOT / "docs" / f"bottleneck_bench{'_video' if args.video else ''}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
