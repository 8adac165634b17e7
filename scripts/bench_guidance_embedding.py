"""Does a student with a guidance-scale embedding follow the CFG scale it is given?

    python scripts/bench_guidance_embedding.py --student work/distill/image-lcd-w --num 200 --out docs/distill_bench_guidance

Rows: the teacher at its default 20 steps with CFG at each --scales value (two evaluations per step; one
at scale 1), the student at --student-steps with each scale embedded (one evaluation per step), and
the baked students of --baked (CFG 4 fixed). Per row, on the prompts of ``scenes.prompt_set`` with seed
i for prompt i: judge adherence and judge-feature FID against the teacher at the same scale. Then the
student-by-teacher matrix of mean judge-feature distances between samples of the same prompt and seed:
if the student follows the scale, each of its rows is closest to the teacher at the scale it was given.
Samples are cached in --cache (work/, not docs), so a rerun only adds rows.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cached(path: Path, make) -> np.ndarray:
    if path.is_file():
        return np.load(path)["images"]
    images = make()
    np.savez_compressed(path, images=images)
    return images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="a student folder with a guidance-scale embedding")
    parser.add_argument("--scales", default="1,2,4,6,8")
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--baked", default="image-lcd", help="comma-separated baked students (reference names or folders)")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teachers-only", action="store_true", help="fill the teacher rows' cache and stop")
    parser.add_argument("--out", default="docs/distill_bench_guidance")
    parser.add_argument("--cache", default="work/guidance_embedding_samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench_distill import generate, load

    from diffaccel.distill import set_student_guidance
    from diffaccel.eval.metrics import fid
    from diffaccel.pipelines.reference import judge as judges
    from diffaccel.pipelines.reference import scenes

    scales = [float(s) for s in args.scales.split(",")]
    prompts, seeds = scenes.prompt_set(args.num), list(range(args.num))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()

    teacher, _ = load("teacher")
    teachers = {}
    for g in scales:
        teachers[g] = _cached(cache / f"teacher-{args.teacher_steps}-g{g:g}-n{args.num}.npz",
                              lambda: generate(teacher, prompts, seeds, args.teacher_steps, g, args.batch)[0])
        print(f"teacher g {g:g}: done ({time.time() - started:.0f} s)", flush=True)
    if args.teachers_only:
        return 0

    student, _ = load(args.student)
    name = Path(args.student).name
    students = {}
    for g in scales:
        def make():
            set_student_guidance(student, g)
            return generate(student, prompts, seeds, args.student_steps, 1.0, args.batch)[0]

        students[g] = _cached(cache / f"{name}-{args.student_steps}-g{g:g}-n{args.num}.npz", make)
    baked = {}
    for model in [m for m in args.baked.split(",") if m]:
        pipe, guidance = load(model)
        baked[Path(model).name] = _cached(cache / f"{Path(model).name}-{args.student_steps}-n{args.num}.npz",
                                          lambda: generate(pipe, prompts, seeds, args.student_steps, guidance, args.batch)[0])

    judge = judges.load_judge("image")
    features = {}

    def feats(key, images):
        if key not in features:
            features[key] = judges.features(judge, images)
        return features[key]

    def adherence(images):
        per_prompt = judges.adherence(judge, images, prompts)
        return float(per_prompt.mean()), float(per_prompt.std(ddof=1) / np.sqrt(len(prompts)))

    rows = []
    for g in scales:
        a, se = adherence(teachers[g])
        rows.append({"row": f"teacher-{args.teacher_steps}, CFG {g:g}", "evaluations": args.teacher_steps * (1 if g == 1 else 2),
                     "scale": g, "adherence": a, "se": se, "fid_same_scale": 0.0})
    for g in scales:
        a, se = adherence(students[g])
        rows.append({"row": f"{name}-{args.student_steps}, CFG {g:g} embedded", "evaluations": args.student_steps,
                     "scale": g, "adherence": a, "se": se, "fid_same_scale": fid(teachers[g], students[g]).value})
    for model, images in baked.items():
        a, se = adherence(images)
        rows.append({"row": f"{model}-{args.student_steps} (CFG 4 baked in)", "evaluations": args.student_steps,
                     "scale": 4.0, "adherence": a, "se": se,
                     "fid_same_scale": fid(teachers[4.0], images).value if 4.0 in teachers else None})

    # mean judge-feature distance, same prompt and seed: student row at s against teacher column at t
    matrix = [[float(np.linalg.norm(feats(("s", s), students[s]) - feats(("t", t), teachers[t]), axis=1).mean())
               for t in scales] for s in scales]
    baked_distances = {model: [float(np.linalg.norm(feats(("b", model), images) - feats(("t", t), teachers[t]),
                                                    axis=1).mean()) for t in scales]
                       for model, images in baked.items()}
    write_report(Path(args.out), args, rows, scales, matrix, baked_distances, time.time() - started, name)
    return 0


def write_report(out: Path, args, rows, scales, matrix, baked_distances, seconds, name) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A student with a guidance-scale embedding against the teacher at each CFG scale",
        "",
        f"`python scripts/bench_guidance_embedding.py {' '.join(sys.argv[1:])}`; {args.num} prompts (seed i for "
        f"prompt i), 64 px, {platform.machine()} CPU, {args.threads} thread(s), {seconds / 60:.0f} min.",
        "",
        "| row | evaluations | adherence ± SE | FID-j vs the teacher at the same scale |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        fid_text = "—" if r["fid_same_scale"] in (None, 0.0) else f"{r['fid_same_scale']:.1f}"
        lines.append(f"| {r['row']} | {r['evaluations']} | {100 * r['adherence']:.1f}% ± {100 * r['se']:.1f} | {fid_text} |")
    lines += ["", "Mean judge-feature distance between samples of the same prompt and seed (row: what was sampled; "
              "column: the teacher at that CFG scale; bold: the row's nearest teacher):", "",
              "| sampled | " + " | ".join(f"teacher CFG {t:g}" for t in scales) + " |",
              "|---|" + "---:|" * len(scales)]
    named = [(f"{name}, CFG {s:g} embedded", row) for s, row in zip(scales, matrix)]
    named += [(f"{model} (CFG 4 baked in)", row) for model, row in baked_distances.items()]
    for label, row in named:
        best = int(np.argmin(row))
        cells = [f"**{v:.2f}**" if i == best else f"{v:.2f}" for i, v in enumerate(row)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"rows": rows, "scales": scales, "distance_matrix": matrix,
                                                 "baked_distances": baked_distances}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
