"""ResShift benchmark: x2 super-resolution quality against NFE, and the generate-small-then-upscale cascade.

    python scripts/train_resshift.py cache --split heldout            # once: 200 reference-model outputs at 128 px
    python scripts/bench_resshift.py                                  # -> docs/resshift_bench.{md,json,png}
    python scripts/bench_resshift.py --num 20 --cascade-num 20 --out work/resshift_quick   # a quick look

Part 1 (quality vs NFE). Two held-out test sets at 128 px, each downsampled bicubically (antialiased)
to 64 px: ``--num`` procedural scenes (their own seed stream) and ``--num`` outputs of the reference
image model at 128 px (``scenes.prompt_set`` prompts, seed i; cached by train_resshift.py). Rows:
bicubic and Lanczos (PIL), the one-step regression model, the flow-matching model from pure noise
at 4 / 15 / 50 Euler steps, ResShift-4 and ResShift-15 (and ResShift-15 respaced to 4 steps); the
three trained networks are the same 1.7M-parameter UNet trained for the same kind of budget. Metrics:
PSNR and SSIM against the HR image (``eval.metrics``); the judge-feature distance (mean L2 distance
between the judge embeddings of the upscaled and the HR image, paired) and the judge-feature Fréchet
distance of the set; the judge's adherence of the upscaled image to its caption; the high-frequency
energy ratio (energy above the LR Nyquist frequency, upscaled / HR, luminance; 1 = as sharp as the HR
image, bicubic is far below); CPU seconds per image (one thread).

Part 2 (cascade). For ``--cascade-num`` prompts of ``scenes.prompt_set`` (seed i): the reference image
model at 128 px directly (20 steps, guidance 4: the cached outputs, checked bit-equal on the timing
subset) against 64 px + ResShift-4 (``diffaccel generate --upscale 2``); plus 64 px alone and 64 px +
bicubic. Judge adherence; judge-feature FID against the procedural renders of the same scenes at
128 px; wall time of both paths measured in this run on ``--timing-num`` prompts (batches of 8).

Each row's outputs and scores are kept under work/resshift_bench/ so a rerun resumes.
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
CACHE = ROOT / "work" / "resshift_cache"
ROWS = ROOT / "work" / "resshift_bench"
WEIGHTS = ROOT / "pipelines" / "reference" / "weights"
BASELINE_WEIGHTS = ROOT / "scripts" / "weights" / "upscale_baselines"  # the SR baselines (bench only)

from diffaccel.eval.features import JudgeFeatures  # noqa: E402
from diffaccel.eval.metrics import fid, judge_adherence, psnr, ssim  # noqa: E402
from diffaccel.pipelines import reference  # noqa: E402
from diffaccel.pipelines.reference import scenes  # noqa: E402
from diffaccel.pipelines.restoration import data  # noqa: E402
from diffaccel.pipelines.restoration.baselines import flow_upscale, pil_upscale, regression_upscale  # noqa: E402

BATCH = 8  # prompts per reference-model call
SR_BATCH = 16  # images per upscaler call


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ metrics


def hf_energy(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """(N,) energy of the luminance spectrum above ``cutoff`` cycles/px (0.25 = the Nyquist frequency
    of the x2-downsampled image: detail the LR image cannot hold)."""
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    lum = lum - lum.mean(dim=(-2, -1), keepdim=True)
    spec = torch.fft.fft2(lum.double(), norm="ortho").abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.fftfreq(x.shape[-1]).abs().view(1, -1)
    mask = torch.maximum(fy, fx) > cutoff
    return (spec * mask).sum(dim=(-2, -1))


def scores(sr: torch.Tensor, hr: torch.Tensor, captions: list[str], judge: JudgeFeatures) -> dict:
    f_sr, f_hr = judge(sr).numpy(), judge(hr).numpy()
    return {
        "psnr": float(psnr(hr, sr).mean),
        "ssim": float(ssim(hr, sr, precision=torch.float32).mean),  # float32: see metrics.ssim
        "feat_dist": float(np.linalg.norm(f_sr - f_hr, axis=1).mean()),
        "fid_judge": float(fid(hr, sr, features=judge).value),
        "adherence": float(judge_adherence(sr, captions).mean),
        "hf_ratio": float(hf_energy(sr).sum() / hf_energy(hr).sum()),
    }


# ------------------------------------------------------------------------------------------ rows


def load_unet(folder: Path):
    from diffusers import UNet2DModel

    if not (folder / "config.json").is_file():
        raise SystemExit(f"No model at {folder}: train it with scripts/train_resshift.py.")
    return UNet2DModel.from_pretrained(folder, dtype=torch.float32).eval()


def methods(extra: dict[str, Path] | None = None) -> dict:
    """name -> (NFE, family, function lr (N,3,h,w) -> hr (N,3,2h,2w), all in [0, 1]); models load lazily.

    ``extra``: name -> folder of an experimental ``ResShiftPipeline`` (``train_resshift.py --out``), scored
    as one more row at its own T steps.
    """
    loaded: dict = {}

    def resshift(name: str, steps: int):
        def run(lr, seed):
            if name not in loaded:
                loaded[name] = reference.load(name)
            pipe = loaded[name]
            gens = [torch.Generator().manual_seed(seed + i) for i in range(len(lr))]
            return pipe(image=lr, num_inference_steps=steps, generator=gens, output_type="pt").images
        return run

    def unet(kind: str):
        if kind not in loaded:
            loaded[kind] = load_unet(BASELINE_WEIGHTS / kind)
        return loaded[kind]

    def flow(steps: int):
        def run(lr, seed):
            gens = [torch.Generator().manual_seed(seed + i) for i in range(len(lr))]
            return flow_upscale(unet("flow"), lr, steps, generator=gens)
        return run

    return {
        "bicubic": (0, "interpolation", lambda lr, seed: pil_upscale(lr, 2, "bicubic")),
        "lanczos": (0, "interpolation", lambda lr, seed: pil_upscale(lr, 2, "lanczos")),
        "regression": (1, "regression", lambda lr, seed: regression_upscale(unet("regression"), lr)),
        "flow-4": (4, "flow", flow(4)),
        "flow-15": (15, "flow", flow(15)),
        "flow-50": (50, "flow", flow(50)),
        "resshift15@4": (4, "resshift15", resshift("upscale15", 4)),
        "resshift-15": (15, "resshift15", resshift("upscale15", 15)),
        "resshift-4": (4, "resshift4", resshift("upscale", 4)),
        **{name: extra_row(name, Path(folder), loaded) for name, folder in (extra or {}).items()},
    }


def extra_row(name: str, folder: Path, loaded: dict) -> tuple:
    from diffaccel.pipelines.restoration import ResShiftPipeline

    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--extra {name}={folder}: no ResShiftPipeline folder there (train_resshift.py --out DIR "
                         f"exports to DIR/export).")
    steps = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]

    def run(lr, seed):
        if name not in loaded:
            loaded[name] = ResShiftPipeline.from_pretrained(folder)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(lr))]
        return loaded[name](image=lr, num_inference_steps=steps, generator=gens, output_type="pt").images
    return steps, f"extra:{name}", run


TRAINING_STATES = {
    "regression": BASELINE_WEIGHTS / "regression" / "training_state.json",
    "flow": BASELINE_WEIGHTS / "flow" / "training_state.json",
    "resshift15": WEIGHTS / "upscale15" / "unet" / "training_state.json",
    "resshift4": WEIGHTS / "upscale" / "unet" / "training_state.json",
}


def training_states(extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """family -> the training_state.json of the weights its rows use, the ``--extra`` folders included."""
    return {**TRAINING_STATES, **{f"extra:{name}": Path(folder) / "unet" / "training_state.json"
                                  for name, folder in (extra or {}).items()}}


def weights_stamp(state: Path | None) -> int | None:
    """Training steps of the weights a row uses (None: no trained model), so that a row cached from
    older weights is recomputed after more training."""
    return json.loads(state.read_text())["steps"] if state is not None and state.is_file() else None


def run_row(name: str, fn, lr: torch.Tensor, tag: str, state: Path | None = None) -> tuple[torch.Tensor, float]:
    """Outputs (N, 3, H, W) in [0, 1] and CPU seconds per image; cached under work/resshift_bench/."""
    path = ROWS / f"{tag}_{name}.pt"
    stamp = weights_stamp(state)
    if path.is_file():
        saved = torch.load(path)
        if saved["out"].shape[0] == lr.shape[0] and saved.get("weights_steps") == stamp:
            return saved["out"].float() / 255, saved["seconds_per_image"]
    start = time.perf_counter()
    out = torch.cat([fn(lr[i : i + SR_BATCH], 1000 + i) for i in range(0, len(lr), SR_BATCH)])
    per = (time.perf_counter() - start) / len(lr)
    ROWS.mkdir(parents=True, exist_ok=True)
    torch.save({"out": (out * 255).round().to(torch.uint8), "seconds_per_image": per, "weights_steps": stamp}, path)
    return (out * 255).round() / 255, per


def quality_vs_nfe(num: int, judge: JudgeFeatures, extra: dict[str, Path] | None = None) -> dict:
    proc_hr, proc_captions = data.heldout_procedural(num)
    states = training_states(extra)
    ref_hr, ref_captions, _ = data.load_cache(CACHE, "heldout", 128)
    if len(ref_hr) < num:
        raise SystemExit(f"Only {len(ref_hr)} cached reference outputs; run train_resshift.py cache --split heldout --num {num}.")
    sets = {"procedural": (proc_hr, proc_captions), "reference": (ref_hr[:num], ref_captions[:num])}
    results: dict = {}
    for set_name, (hr, captions) in sets.items():
        lr = data.degrade(hr)  # bicubic, antialiased, no blur/noise: the evaluation degradation
        hr_q = (hr * 255).round() / 255
        results[set_name] = {"n": len(hr), "hr": {"adherence": float(judge_adherence(hr_q, captions).mean)}}
        for name, (nfe, family, fn) in methods(extra).items():
            out, per = run_row(name.replace("/", "_").replace(" ", "_"), fn, lr, f"{set_name}{num}", states.get(family))
            row = scores(out, hr_q, captions, judge)
            row.update(nfe=nfe, family=family, seconds_per_image=round(per, 4))
            results[set_name][name] = row
            log(f"{set_name:10s} {name:13s} NFE {nfe:2d}  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}  "
                f"feat {row['feat_dist']:.3f}  FID-j {row['fid_judge']:.2f}  adh {row['adherence']:.3f}  "
                f"HF {row['hf_ratio']:.2f}  {per:.3f} s/img")
    return results


# ------------------------------------------------------------------------------------------ cascade


def generate(pipe, prompts: list[str], seeds: list[int], resolution: int) -> torch.Tensor:
    kwargs = reference.call_defaults("image")
    kwargs["height"] = kwargs["width"] = resolution
    outs = []
    for i in range(0, len(prompts), BATCH):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + BATCH]]
        images = pipe(prompts[i : i + BATCH], generator=gens, output_type="np", **kwargs).images
        outs.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float())
    return torch.cat(outs).clamp(0, 1)


def scene_renders(num: int, resolution: int = 128) -> torch.Tensor:
    """The procedural renders of ``scenes.prompt_set(num)``'s scenes (the same seed stream)."""
    rng = np.random.default_rng(data.HELDOUT_PROMPTS_SEED)
    return torch.from_numpy(np.stack([scenes.render_image(scenes.sample_scene(rng), resolution) for _ in range(num)])).permute(0, 3, 1, 2)


def cascade(num: int, timing_num: int, judge: JudgeFeatures) -> dict:
    image = reference.load("image")
    upscaler = reference.load("upscale")
    prompts, seeds = data.reference_prompts("heldout", num)

    def upscale(small: torch.Tensor, first_seed: int) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(first_seed + i) for i in range(len(small))]
        return upscaler(image=small, generator=gens, output_type="pt").images

    # wall time, measured here: direct 128 px against 64 px + ResShift-4, same prompts, seeds and batches
    t_prompts, t_seeds = prompts[:timing_num], seeds[:timing_num]
    generate(image, t_prompts[:1], t_seeds[:1], 64)  # warm-up
    start = time.perf_counter()
    direct_t = generate(image, t_prompts, t_seeds, 128)
    direct_s = time.perf_counter() - start
    start = time.perf_counter()
    small_t = generate(image, t_prompts, t_seeds, 64)
    gen_s = time.perf_counter() - start
    casc_t = torch.cat([upscale(small_t[i : i + BATCH], t_seeds[i]) for i in range(0, len(small_t), BATCH)])
    casc_s = time.perf_counter() - start
    cached, _, _ = data.load_cache(CACHE, "heldout", 128)
    cache_matches = bool(torch.equal((direct_t * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8),
                                     (cached[:timing_num] * 255).round().to(torch.uint8)))
    log(f"timing on {timing_num}: direct 128 px {direct_s:.1f} s, 64 px {gen_s:.1f} s + ResShift-4 {casc_s - gen_s:.1f} s "
        f"= {casc_s:.1f} s (ratio {casc_s / direct_s:.3f}); cached direct outputs reproduced bit-equal: {cache_matches}")

    # quality over all prompts: direct = the cached 128 px outputs (same prompts, seeds, call)
    direct = ((cached[:num] * 255).round() / 255)
    path = ROWS / f"cascade{num}_small64.pt"
    if path.is_file():
        small = torch.load(path).float() / 255
    else:
        small = generate(image, prompts, seeds, 64)
        ROWS.mkdir(parents=True, exist_ok=True)
        torch.save((small * 255).round().to(torch.uint8), path)
        small = (small * 255).round() / 255
    up = torch.cat([upscale(small[i : i + BATCH], seeds[i]) for i in range(0, num, BATCH)])
    bicubic = pil_upscale(small, 2, "bicubic")
    real = scene_renders(num)
    rows = {}
    for name, x in [("direct-128", direct), ("cascade-64+resshift4", up), ("64+bicubic", bicubic), ("64-only", small)]:
        rows[name] = {
            "adherence": float(judge_adherence(x, prompts).mean),
            "fid_judge": float(fid(real, x, features=judge).value),
            "hf_ratio_vs_renders": float(hf_energy(x).sum() / hf_energy(real).sum()) if x.shape[-1] == 128 else None,
        }
        log(f"cascade {name:22s} adherence {rows[name]['adherence']:.4f}  FID-judge {rows[name]['fid_judge']:.2f}")
    return {
        "n": num,
        "timing": {
            "n": timing_num, "batch": BATCH, "direct_128_s": round(direct_s, 2), "generate_64_s": round(gen_s, 2),
            "upscale_s": round(casc_s - gen_s, 2), "cascade_s": round(casc_s, 2), "ratio": round(casc_s / direct_s, 4),
            "direct_matches_cache": cache_matches,
        },
        "rows": rows,
        "adherence_gap_points": round(100 * (rows["direct-128"]["adherence"] - rows["cascade-64+resshift4"]["adherence"]), 2),
    }


# ------------------------------------------------------------------------------------------ report


def write_report(result: dict, out: Path) -> None:
    lines = [
        "# ResShift x2 super-resolution: quality against NFE, and the cascade",
        "",
        f"Made by `python scripts/bench_resshift.py` ({result['threads']} CPU thread, torch {result['torch']}). "
        "64 -> 128 px; LR = bicubic (antialiased) downsample of the HR image. Networks: the same 1.7M-parameter "
        "`UNet2DModel` (pixel space, 2x2 space-to-depth) for regression, flow matching and ResShift, trained by "
        "`scripts/train_resshift.py` (minutes and steps below). PSNR/SSIM against HR (SSIM in float32, `metrics.ssim(precision=torch.float32)`); *feat* = mean L2 distance of "
        "judge embeddings (upscaled vs HR, paired); *FID-j* = Fréchet distance in judge features against the HR set; "
        "*adh* = judge adherence of the upscaled image to its caption; *HF* = high-frequency energy (above the LR "
        "Nyquist frequency) of the upscaled set over the HR set's; s/img = CPU seconds per image, one thread.",
        "",
    ]
    for set_name, rows in result["quality"].items():
        hr = rows["hr"]
        title = {"procedural": "held-out procedural scenes", "reference": "reference image model outputs (128 px)"}[set_name]
        lines += [f"## {rows['n']} {title} (adherence of the HR images: {hr['adherence']:.3f})", "",
                  "| method | NFE | PSNR dB | SSIM | feat ↓ | FID-j ↓ | adh | HF | s/img |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            if name in ("n", "hr"):
                continue
            lines.append(f"| {name} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['feat_dist']:.3f} | "
                         f"{r['fid_judge']:.2f} | {r['adherence']:.3f} | {r['hf_ratio']:.2f} | {r['seconds_per_image']:.3f} |")
        lines.append("")
    c = result.get("cascade")
    if c is not None:
        t = c["timing"]
        lines += [
            f"## Cascade: 64 px + ResShift-4 against direct 128 px generation ({c['n']} prompts of `scenes.prompt_set`, seed i)",
            "",
            "| path | adherence | FID-j vs procedural renders ↓ |",
            "|---|---:|---:|",
        ]
        for name, r in c["rows"].items():
            lines.append(f"| {name} | {r['adherence']:.4f} | {r['fid_judge']:.2f} |")
        lines += [
            "",
            f"Wall time, measured in this run on {t['n']} prompts (batches of {t['batch']}, 20 steps, guidance 4, one thread): "
            f"direct 128 px {t['direct_128_s']:.1f} s; cascade {t['cascade_s']:.1f} s = 64 px {t['generate_64_s']:.1f} s + "
            f"ResShift-4 {t['upscale_s']:.1f} s: **{t['ratio']:.2f}x** the time of direct generation. Adherence gap "
            f"(direct − cascade): **{c['adherence_gap_points']:+.2f} points**. The direct row uses the cached 128 px "
            f"outputs; regenerating the timing prompts reproduced them bit-equal: {t['direct_matches_cache']}.",
        ]
    lines += [
        "",
        "Training budgets (one CPU thread each):",
        "",
        "| model | minutes | steps | final loss (last 200) |",
        "|---|---:|---:|---:|",
    ]
    for name, st in result["training"].items():
        lines.append(f"| {name} | {st.get('minutes', '?')} | {st.get('steps', '?')} | {st.get('loss_last_200', '?')} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(result["quality"])
    fig, axes = plt.subplots(2, len(sets), figsize=(5.5 * len(sets), 7), squeeze=False)
    styles = {"flow": ("tab:blue", "o-"), "resshift4": ("tab:red", "*"), "resshift15": ("tab:orange", "s-"),
              "regression": ("tab:green", "^"), "interpolation": ("gray", "x")}
    for col, set_name in enumerate(sets):
        rows = {k: v for k, v in result["quality"][set_name].items() if k not in ("n", "hr")}
        for row, metric in enumerate(("psnr", "feat_dist")):
            ax = axes[row][col]
            for family, (color, style) in styles.items():
                items = sorted(((max(r["nfe"], 0.5), r[metric], k) for k, r in rows.items() if r["family"] == family))
                if not items:
                    continue
                xs, ys, names = zip(*items)
                ax.plot(xs, ys, style, color=color, label=family, markersize=10 if family == "resshift4" else 6)
                if family == "interpolation":
                    for x, y, n in items:
                        ax.annotate(n, (x, y), fontsize=7, xytext=(4, 0), textcoords="offset points")
            for k, r in rows.items():  # --extra rows: experiments, labelled by name
                if r["family"].startswith("extra:"):
                    ax.plot([r["nfe"]], [r[metric]], "D", color="tab:purple", markersize=7)
                    ax.annotate(k, (r["nfe"], r[metric]), fontsize=7, xytext=(4, -8), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("NFE (network evaluations per image; 0 plotted at 0.5)")
            ax.set_ylabel({"psnr": "PSNR (dB) ↑", "feat_dist": "judge-feature distance ↓"}[metric])
            ax.set_title(f"{set_name} ({result['quality'][set_name]['n']} images)")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200, help="images per SR test set (default 200)")
    parser.add_argument("--cascade-num", type=int, default=200, help="prompts of the cascade comparison (default 200)")
    parser.add_argument("--timing-num", type=int, default=16, help="prompts timed for the wall-time ratio (default 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "resshift_bench"), help="output path without suffix")
    parser.add_argument("--skip-cascade", action="store_true")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="score an experimental ResShiftPipeline folder as one more row (repeatable)")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.extra:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--extra {item!r}: give NAME=DIR")
        extra[name] = Path(folder)
    torch.set_num_threads(args.threads)
    judge = JudgeFeatures("image")
    result = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_cascade:
        result["cascade"] = cascade(args.cascade_num, args.timing_num, judge)
        log(json.dumps(result["cascade"]))
    result["quality"] = quality_vs_nfe(args.num, judge, extra)
    training = {}
    for name, folder in [("resshift-4", WEIGHTS / "upscale" / "unet"), ("resshift-15", WEIGHTS / "upscale15" / "unet"),
                         ("flow", BASELINE_WEIGHTS / "flow"), ("regression", BASELINE_WEIGHTS / "regression")]:
        state = folder / "training_state.json"
        training[name] = json.loads(state.read_text()) if state.is_file() else {}
    for name in extra:
        training[name] = json.loads(training_states(extra)[f"extra:{name}"].read_text())
    result["training"] = training
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    plot(result, out)
    log(f"wrote {out}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
