"""Few-step students against their teacher: quality against denoiser evaluations, and wall time.

    python scripts/bench_distill.py --num 200 --out docs/distill_bench

Rows: the teacher with CFG at --teacher-steps (two evaluations per step) and each student at
--student-steps (one evaluation per step: CFG is baked in). Per row, on the prompts of
``scenes.prompt_set`` with seed i for prompt i: judge adherence (± standard error), judge-feature FID
against the teacher's samples at its largest step count and against procedural renders of the same
captions (ground truth), diversity (mean pairwise judge-feature distance among --diversity-seeds
samples of each of --diversity-prompts prompts: mode collapse shows as a drop), and seconds per image
(one thread, batches of --batch). Samples are cached in --cache (default work/distill_bench_samples/, not
in docs: 124 MB at 200 prompts) so a rerun only adds rows.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row_name(model: str, steps: int) -> str:
    return f"{model}-{steps}"


PLAIN_TEACHER = "teacher-g1"  # the teacher without CFG, on the students' trailing steps


@functools.lru_cache(maxsize=None)
def load(model: str):
    """'teacher' -> the reference image model; 'teacher-g1' -> the same without CFG; anything else -> a
    student (a reference name or a folder). Each is loaded once: the sampling rows and the timing pass
    share it."""
    from diffaccel.distill import load_student, student_of
    from diffaccel.pipelines import reference

    if model == "teacher":
        return reference.load("image"), float(reference.info("image")["default_guidance"])
    if model == PLAIN_TEACHER:
        return reference.load("image"), 1.0
    if model in reference.STUDENTS:
        pipe = reference.load(model)
    else:
        pipe = load_student(reference.load("image"), model)
    return pipe, 1.0 if student_of(pipe) else float(reference.info("image")["default_guidance"])


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int,
             **call) -> tuple[np.ndarray, float]:
    images, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        part, part_seeds = prompts[i : i + batch], seeds[i : i + batch]
        torch.manual_seed(part_seeds[0])  # students re-noise with the global generator between steps
        start = time.perf_counter()
        out = pipe(part, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                   generator=[torch.Generator().manual_seed(s) for s in part_seeds], output_type="np", **call).images
        seconds += time.perf_counter() - start
        images.append(out)
    return np.concatenate(images), seconds / len(prompts)


def row_call(model: str, steps: int) -> dict:
    """Extra call arguments of a row: the plain teacher samples on the students' trailing timesteps."""
    from diffaccel.distill.student import trailing_timesteps

    return {"timesteps": trailing_timesteps(steps)} if model == PLAIN_TEACHER else {}


def diversity(judge, samples: np.ndarray, groups: int, per_group: int) -> float:
    """Mean pairwise L2 distance of judge features among the samples of one prompt, over prompts."""
    from diffaccel.pipelines.reference import judge as judges

    feats = judges.features(judge, samples).reshape(groups, per_group, -1)
    distances = [np.linalg.norm(f[a] - f[b]) for f in feats for a, b in itertools.combinations(range(per_group), 2)]
    return float(np.mean(distances))


def time_rows(plan: list[tuple[str, int]], prompts: list[str], args) -> dict[tuple[str, int], float]:
    """Seconds per image of every row, measured in one pass with the rows taking turns, median of repeats
    (so machine noise hits all rows alike)."""
    pipes = {model: load(model) for model in dict.fromkeys(m for m, _ in plan)}
    seeds = list(range(len(prompts)))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in plan}
    for model, steps in plan:  # warm-up
        generate(pipes[model][0], prompts[: args.batch], seeds[: args.batch], steps, pipes[model][1], args.batch,
                 **row_call(model, steps))
    for _ in range(args.timing_repeats):
        for model, steps in plan:
            pipe, guidance = pipes[model]
            times[(model, steps)].append(generate(pipe, prompts, seeds, steps, guidance, args.batch,
                                                  **row_call(model, steps))[1])
    return {key: float(np.median(value)) for key, value in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--students", default="image-lcd", help="comma-separated: reference student names or folders")
    parser.add_argument("--student-steps", default="1,2,4,8")
    parser.add_argument("--teacher-steps", default="4,8,20,50", help="the last is the FID reference")
    parser.add_argument("--plain-teacher-steps", default="2,4",
                        help="rows of the teacher without CFG (guidance 1) on trailing timesteps, as students sample: "
                        "the baseline a student must beat at equal evaluations")
    parser.add_argument("--diversity-prompts", type=int, default=16)
    parser.add_argument("--diversity-seeds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timing-prompts", type=int, default=16, help="prompts of the timing pass (rows interleaved)")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--heldout-judge", default=None,
                        help="a second image judge (scripts/train_judge.py --seed 1 --out-dir DIR; DIR/image.safetensors) "
                        "that no student trained against: its adherence column checks for reward hacking")
    parser.add_argument("--paired-base", default="image-lcd",
                        help="a student whose rows the other students' rows are compared with prompt by prompt (same "
                        "prompt, seed and step count): the mean paired difference ± its standard error, under both judges")
    parser.add_argument("--samples-only", action="store_true", help="fill the sample cache, no timing or report")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/distill_bench")
    parser.add_argument("--cache", default="work/distill_bench_samples", help="folder of cached samples per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffaccel.eval.metrics import fid
    from diffaccel.pipelines.reference import judge as judges
    from diffaccel.pipelines.reference import scenes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    prompts = scenes.prompt_set(args.num)
    seeds = list(range(args.num))
    rng = np.random.default_rng(1234)  # the same stream as prompt_set: the scenes its captions state
    truth = np.stack([scenes.render_image(scenes.sample_scene(rng), 64) for _ in range(args.num)])
    div_prompts = [p for p in prompts[: args.diversity_prompts] for _ in range(args.diversity_seeds)]
    div_seeds = [10_000 + i for i in range(len(div_prompts))]
    judge = judges.load_judge("image")
    heldout = judges.load_judge("image", path=args.heldout_judge) if args.heldout_judge else None

    plan = [("teacher", int(k)) for k in args.teacher_steps.split(",")]
    plan += [(PLAIN_TEACHER, int(k)) for k in args.plain_teacher_steps.split(",") if k]
    plan += [(s, int(k)) for s in args.students.split(",") if s for k in args.student_steps.split(",")]
    rows, started = [], time.time()
    for model, steps in plan:
        name = _row_name(model if model in ("teacher", PLAIN_TEACHER) else Path(model).name, steps)
        cache = Path(args.cache) / f"{name}.npz"
        if cache.is_file():
            saved = np.load(cache)
            images, div = saved["images"], saved["diversity"]
        else:
            pipe, guidance = load(model)
            images, _ = generate(pipe, prompts, seeds, steps, guidance, args.batch, **row_call(model, steps))
            div, _ = generate(pipe, div_prompts, div_seeds, steps, guidance, args.batch, **row_call(model, steps))
            np.savez_compressed(cache, images=images, diversity=div)
        per_prompt = judges.adherence(judge, images, prompts)
        per_prompt_heldout = judges.adherence(heldout, images, prompts) if heldout else None
        rows.append({
            "row": name, "model": model, "steps": steps,
            "evaluations": steps * (2 if model == "teacher" else 1),
            "adherence": float(per_prompt.mean()), "adherence_se": float(per_prompt.std(ddof=1) / np.sqrt(len(prompts))),
            "heldout_adherence": float(per_prompt_heldout.mean()) if heldout else None,
            "fid_truth": fid(truth, images).value,
            "diversity": diversity(judge, div, args.diversity_prompts, args.diversity_seeds),
            "images": images,
            "per_prompt": per_prompt,
            "per_prompt_heldout": per_prompt_heldout,
        })
        print(f"{name}: adherence {rows[-1]['adherence']:.4f} ({time.time() - started:.0f} s)", flush=True)
    if args.samples_only:
        return 0
    timing = time_rows(plan, prompts[: args.timing_prompts], args)
    for row, (model, steps) in zip(rows, plan):
        row["seconds_per_image"] = timing[(model, steps)]
    reference_row = next(r for r in rows if r["model"] == "teacher" and r["steps"] == max(k for m, k in plan if m == "teacher"))
    reference_images = reference_row["images"]
    for row in rows:
        row["fid_teacher"] = fid(reference_images, row.pop("images")).value
    paired = paired_differences(rows, Path(args.paired_base).name)
    report(rows, reference_row, args, out, time.time() - started, paired)
    return 0


def paired_differences(rows: list[dict], base: str) -> list[dict]:
    """Each student row against ``base``'s row at the same step count, prompt by prompt: the mean difference
    of adherence (points) and its standard error, under the shipped and the held-out judge. Removes the
    per-prompt arrays from ``rows``."""
    per_prompt = {r["row"]: (r.pop("per_prompt"), r.pop("per_prompt_heldout")) for r in rows}
    out = []
    for r in rows:
        name = Path(r["model"]).name
        base_row = f"{base}-{r['steps']}"
        if r["model"] in ("teacher", PLAIN_TEACHER) or name == base or base_row not in per_prompt:
            continue
        entry = {"row": r["row"], "base": base_row}
        for key, index in (("judge", 0), ("heldout", 1)):
            if per_prompt[r["row"]][index] is None:
                continue
            d = 100.0 * (np.asarray(per_prompt[r["row"]][index], dtype=float) - np.asarray(per_prompt[base_row][index], dtype=float))
            entry[key] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))))
        out.append(entry)
    return out


def report(rows: list[dict], reference_row: dict, args, out: Path, seconds: float, paired: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = next((r for r in rows if r["model"] == "teacher" and r["steps"] == 20), reference_row)
    heldout = rows[0]["heldout_adherence"] is not None
    lines = [
        "# Few-step students of the reference image model",
        "",
        f"`python scripts/bench_distill.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, "
        f"torch {torch.__version__}, {args.threads} thread(s), {seconds / 60:.0f} min.",
        "",
        f"{args.num} prompts (`scenes.prompt_set`), seed i for prompt i, 64 px. Evaluations = transformer calls per "
        f"image (the teacher's CFG counts two per step; a student's CFG is baked in, one per step). Adherence = the "
        f"shipped judge ± standard error; Δ = points against the teacher at its default 20 steps. FID-j = Fréchet "
        f"distance in judge features against the teacher's {reference_row['steps']}-step samples and against "
        f"procedural renders of the same captions (ground truth). Diversity = mean pairwise judge-feature distance "
        f"among {args.diversity_seeds} seeds of each of {args.diversity_prompts} prompts. s/img = wall time per "
        f"image in batches of {args.batch} (the first {args.timing_prompts} prompts, rows taking turns, median of "
        f"{args.timing_repeats}); speedup against the teacher at 20 steps. {PLAIN_TEACHER}-K = the teacher without "
        f"CFG (guidance 1) on the students' trailing timesteps T(1 − i/K): what a student must beat at equal "
        f"evaluations."
        + (f" Held-out judge = adherence under a second judge (`{args.heldout_judge}`, trained from another seed) "
           f"that no student was trained against." if heldout else ""),
        "",
        "| row | evaluations | adherence | Δ points |" + (" held-out judge |" if heldout else "") +
        " FID-j vs teacher-" + str(reference_row["steps"]) + " | FID-j vs truth | diversity | s/img | speedup |",
        "|---|---:|---:|---:|" + ("---:|" if heldout else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['evaluations']} | {r['adherence']:.1%} ± {r['adherence_se']:.1%} | "
            f"{100 * (r['adherence'] - default['adherence']):+.1f} | "
            + (f"{r['heldout_adherence']:.1%} | " if heldout else "") + f"{r['fid_teacher']:.2f} | {r['fid_truth']:.2f} | "
            f"{r['diversity']:.3f} | {r['seconds_per_image']:.3f} | {default['seconds_per_image'] / r['seconds_per_image']:.1f}x |"
        )
    if paired:
        lines += ["", f"Paired against `{args.paired_base}` at the same step count (same prompts and seeds): mean "
                  f"difference of adherence in points ± its standard error.", "",
                  "| row | against | Δ shipped judge | Δ held-out judge |", "|---|---|---:|---:|"]
        for e in paired:
            cells = [f"{e[k][0]:+.2f} ± {e[k][1]:.2f}" if k in e else "—" for k in ("judge", "heldout")]
            lines.append(f"| {e['row']} | {e['base']} | {cells[0]} | {cells[1]} |")
    lines += ["", "![adherence vs evaluations](quality_vs_evaluations.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"args": vars(args), "rows": rows, "paired": paired}, indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        label = {"teacher": "teacher (CFG)", PLAIN_TEACHER: "teacher without CFG"}.get(model, Path(model).name)
        axes[0].plot([r["evaluations"] for r in mine], [100 * r["adherence"] for r in mine], "o-", label=label)
        axes[1].plot([r["evaluations"] for r in mine], [r["fid_truth"] for r in mine], "o-", label=label)
    for ax, what in zip(axes, ("judge adherence (%)", "FID-j vs ground truth")):
        ax.set_xscale("log")
        ax.set_xlabel("transformer evaluations per image")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "quality_vs_evaluations.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
