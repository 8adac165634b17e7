"""Video students against their teacher (the reference video model): adherence, the VBench-style
dimensions, and wall time per clip.

    python scripts/bench_distill_video.py --students work/distill/video-tdm --num 48

Rows: the teacher with CFG at --teacher-steps (two evaluations per step) and each student at
--student-steps (CFG baked in). Prompts of ``scenes.prompt_set(clip=True)``, seed i
for prompt i, the model's default 64 px and 9 frames. Per row: the clip judge's adherence (± standard
error), temporal flickering, motion smoothness, dynamic degree, subject and background consistency
(``diffaccel eval``'s video dimensions) and seconds per clip (one thread; the rows take turns in the
timing pass, median of --timing-repeats). Writes ``OUT/report.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIMENSIONS = ("temporal_flickering", "motion_smoothness", "dynamic_degree", "subject_consistency",
              "background_consistency")


def load(model: str):
    """(pipeline, guidance) of a row: the teacher, or a student folder (a sparsity-aware one with the
    block-sparse attention it was trained with); ``FOLDER+sparse:OTHER`` samples the student in FOLDER with
    the attention the student in OTHER was trained with (training-free sparsity: the control of
    sparsity-aware training)."""
    import diffaccel
    from diffaccel.distill import load_student
    from diffaccel.distill.student import student_attention, student_of
    from diffaccel.pipelines import reference

    if model == "teacher":
        return reference.load("video"), float(reference.info("video")["default_guidance"])
    folder, _, attention_of = model.partition("+sparse:")
    pipe = load_student(reference.load("video"), folder)
    if attention_of:
        from diffaccel.distill import StudentCard

        attention = student_attention(StudentCard.load(attention_of))
        if attention is None:
            raise ValueError(f"{attention_of} was not trained with block-sparse attention.")
    else:
        attention = student_attention(student_of(pipe))
    if attention is not None:
        diffaccel.accelerate(pipe, attention=attention)
    return pipe, 1.0


def attention_density(pipe) -> float | None:
    """The kept share of attention blocks over the last calls of a block-sparse row (None: dense)."""
    from diffaccel.api import PIPE_ATTRIBUTE
    from diffaccel.attention import attention_density as density

    if getattr(pipe, PIPE_ATTRIBUTE, None) is None:
        return None
    import diffaccel

    return density(diffaccel.stats(pipe, cumulative=True))


def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int) -> tuple[np.ndarray, float]:
    """Clips (n, F, H, W, 3) in [0, 1] and seconds per clip."""
    from diffaccel.pipelines import reference

    frames = reference.info("video")["frames"]
    clips, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        torch.manual_seed(i)  # LCD students re-noise with the global generator
        start = time.perf_counter()
        out = pipe(part, height=64, width=64, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                   generator=[torch.Generator().manual_seed(i + j) for j in range(len(part))], output_type="np").frames
        seconds += time.perf_counter() - start
        clips.append(np.asarray(out))
    return np.concatenate(clips), seconds / len(prompts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", required=True, help="comma-separated student folders")
    parser.add_argument("--num", type=int, default=48)
    parser.add_argument("--student-steps", default="2,4,8")
    parser.add_argument("--teacher-steps", default="20")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--timing-prompts", type=int, default=8)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/distill_bench_video")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffaccel.eval.video import evaluate_videos
    from diffaccel.pipelines.reference import scenes

    prompts = scenes.prompt_set(args.num, clip=True)
    plan = [("teacher", int(k)) for k in args.teacher_steps.split(",")]
    plan += [(s, int(k)) for s in args.students.split(",") if s for k in args.student_steps.split(",")]
    pipes = {model: load(model) for model in dict.fromkeys(m for m, _ in plan)}
    rows, started = [], time.time()
    for model, steps in plan:
        pipe, guidance = pipes[model]
        clips, _ = generate(pipe, prompts, steps, guidance, args.batch)
        scores = evaluate_videos(clips, prompts, dimensions=DIMENSIONS)
        adherence = scores["judge_adherence"].per_clip
        name = Path(model.partition("+sparse:")[0]).name + ("+sparse" if "+sparse:" in model else "")
        rows.append({"row": f"{name}-{steps}", "model": model, "steps": steps,
                     "evaluations": steps * (2 if guidance > 1 else 1),
                     "adherence": float(np.mean(adherence)),
                     "adherence_se": float(np.std(adherence, ddof=1) / np.sqrt(len(adherence))),
                     "attention_density": attention_density(pipe),
                     **{d: float(scores[d].mean) for d in DIMENSIONS}})
        print(f"{rows[-1]['row']}: adherence {rows[-1]['adherence']:.4f} ({time.time() - started:.0f} s)", flush=True)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in plan}
    timing_prompts = prompts[: args.timing_prompts]
    for _ in range(args.timing_repeats):  # the rows take turns, so machine noise hits them alike
        for model, steps in plan:
            pipe, guidance = pipes[model]
            times[(model, steps)].append(generate(pipe, timing_prompts, steps, guidance, args.batch)[1])
    base = rows[[m for m, _ in plan].index("teacher")]
    for row, key in zip(rows, plan):
        row["seconds_per_clip"] = float(np.median(times[key]))
    for row in rows:
        row["speedup"] = base["seconds_per_clip"] / row["seconds_per_clip"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ("| row | evaluations | attention | adherence | Δ points | flickering | smoothness | dynamic | subject | "
              "background | s/clip | speedup |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['row']} | {r['evaluations']} | "
             f"{'dense' if r['attention_density'] is None else format(r['attention_density'], '.0%') + ' of blocks'} | "
             f"{100 * r['adherence']:.1f}% ± {100 * r['adherence_se']:.1f} | "
             f"{100 * (r['adherence'] - base['adherence']):+.1f} | {r['temporal_flickering']:.4f} | "
             f"{r['motion_smoothness']:.4f} | {r['dynamic_degree']:.3f} | {r['subject_consistency']:.4f} | "
             f"{r['background_consistency']:.4f} | {r['seconds_per_clip']:.3f} | {r['speedup']:.1f}x |" for r in rows]
    command = "python scripts/bench_distill_video.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "report.md").write_text(
        f"# Video students against the reference video model\n\n`{command}`\n\n{len(prompts)} prompts, seed i for "
        f"prompt i, 64 px, 9 frames; {args.threads} thread(s) on {platform.processor() or platform.machine()}; timing: "
        f"{args.timing_prompts} prompts, rows in turn, median of {args.timing_repeats}; {time.time() - started:.0f} s in "
        f"all.\n\n{header}\n" + "\n".join(lines) + "\n")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
