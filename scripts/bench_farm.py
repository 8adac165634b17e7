"""Render-farm throughput against ``--batch-size``, and what batching does to the outputs.

    python scripts/bench_farm.py --model image --num 32 --batch-sizes 1,2,4,8 --preset fast --repeats 2

The farm's local engine renders the same prompts (the reference scenes, seed i for prompt i) into a fresh
folder per batch size and repeat, with one pipeline loaded once; batch sizes take turns within a repeat.
Reported per batch size: items per second (median over repeats of the run's wall time, writing included),
the speedup over batch 1, each item's PSNR to its batch-1 output (the same item id: a batch's cache
decisions and padding change it), and the judge's prompt adherence on the reference models. Writes a
markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffaccel.loading import load_model
from diffaccel.parallel.engines import EngineOptions
from diffaccel.parallel.farm import run_farm
from diffaccel.parallel.items import PromptLine
from diffaccel.parallel.job import make_job
from diffaccel.parallel.manifest import read_manifest
from diffaccel.eval.metrics import judge_adherence, psnr
from diffaccel.pipelines import reference
from diffaccel.pipelines.reference import scenes


def read_outputs(out: Path) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (prompt, pixels in [0, 1]) of every done row of a farm folder."""
    import imageio.v3 as iio

    outputs = {}
    for row in read_manifest(out):
        if row.status == "done":
            pixels = np.asarray(iio.imread(out / row.path, index=None if row.path.endswith(".mp4") else 0))
            outputs[row.id] = (row.prompt, pixels.astype(np.float64) / 255.0)
    return outputs


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="image", choices=list(reference.NAMES),
                        help="the embedded image or video model")
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline (cuda on a GPU machine)")
    parser.add_argument("--out", default=None, help="markdown report (default docs/farm_bench_<model>.md)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if sizes[0] != 1 or any(size < 1 for size in sizes):
        parser.error("--batch-sizes must start with 1 (the reference) and hold sizes >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    video = reference.info(args.model)["is_video"]
    pipe = load_model(args.model, args.device).pipe
    prompts = [PromptLine(p, i, None, {}, i) for i, p in enumerate(scenes.prompt_set(args.num, clip=video))]
    call = {"num_inference_steps": args.steps} if args.steps else {}
    jobs = {size: make_job(args.model, args.preset, call, batch_size=size) for size in sizes}
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_farm(jobs[1], prompts[:2], Path(tmp) / "warm-up", "local", EngineOptions(progress=False), pipe=pipe)
        for repeat in range(args.repeats):
            for size in sizes:
                folder = Path(tmp) / f"b{size}-r{repeat}"
                summary = run_farm(jobs[size], prompts, folder, "local", EngineOptions(progress=False), pipe=pipe)
                if summary.failed:
                    raise SystemExit(f"batch {size}: {summary.failed} item(s) failed; see {folder}/manifest")
                seconds[size].append(summary.seconds)
                print(f"repeat {repeat + 1}, batch {size}: {summary.seconds:.1f} s", flush=True)
        outputs = {size: read_outputs(Path(tmp) / f"b{size}-r0") for size in sizes}
    base = statistics.median(seconds[1])
    lines = [f"# Render farm throughput against batch size, reference {args.model} model", "",
             f"`python scripts/bench_farm.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"{time.strftime('%Y-%m-%d')}, {hardware(args.device)}, "
             f"{time.perf_counter() - start:.0f} s. {args.num} prompts (`scenes.prompt_set`), seed i for prompt i, "
             f"preset `{args.preset}`, the model's default call{' with ' + str(call) if call else ''}; local engine, "
             f"one pipeline; {args.repeats} repeats, batch sizes taking turns.", "",
             "| batch size | median s (all items) | items / s | speedup | PSNR to batch 1 (mean / min) | adherence |",
             "|---|---|---|---|---|---|"]
    for size in sizes:
        median = statistics.median(seconds[size])
        ids = list(outputs[size])
        pixels = np.stack([outputs[size][ident][1] for ident in ids])
        fidelity = psnr(np.stack([outputs[1][ident][1] for ident in ids]), pixels)
        closeness = ("identical" if size == 1 else
                     f"{fidelity.mean:.1f} / {fidelity.per_sample.min():.1f} dB")
        score = judge_adherence(pixels, [outputs[size][ident][0] for ident in ids], kind=args.model).mean
        lines.append(f"| {size} | {median:.2f} | {args.num / median:.2f} | {base / median:.2f}x | {closeness} | "
                     f"{score:.1%} |")
    report = "\n".join(lines) + "\n"
    out = Path(args.out or Path(__file__).resolve().parents[1] / "docs" / f"farm_bench_{args.model}.md")
    out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
