"""The evaluation jobs behind ``diffaccel eval ...`` and ``diffaccel bench``.

Each takes the parsed command-line arguments, does its work resumably where it generates, and
writes a JSON result that names the model, the config and the feature network of every number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import diffaccel
from diffaccel.loading import load_model, read_prompts
from diffaccel.lora import parse_loras
from diffaccel.media import pipeline_samples

from . import metrics
from .samples import SampleJob, generate_samples, list_samples, load_samples


def _write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _features(args) -> Any:
    if args.features == "inception":
        from .features import inception_features

        return inception_features(args.inception_weights)
    return args.features


def _call_kwargs(loaded, args) -> dict:
    kwargs = dict(loaded.defaults)
    for name, value in (
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance),
        ("height", getattr(args, "height", None)),
        ("width", getattr(args, "width", None)),
        ("num_frames", getattr(args, "frames", None)),
    ):
        if value is not None:
            kwargs[name] = value
    if "num_frames" in kwargs and not loaded.is_video:
        raise ValueError(f"--frames applies to video models; {loaded.name} makes images.")
    return kwargs


def _accel_spec(args):
    """The preset name or config file asked for (checked here, before any model loads)."""
    spec = args.config or args.preset or "off"
    diffaccel.resolve_config(spec)
    return spec


def _procedural_real(kind: str, num: int, seed: int, resolution: int) -> np.ndarray:
    from diffaccel.pipelines.reference import build, scenes

    pixels, _, _ = scenes.sample_batch(np.random.default_rng(seed), num, resolution, clip=kind == "video",
                                       frames=build.VIDEO_FRAMES)
    return pixels


def fid_stats_command(args) -> int:
    """Precompute real-set statistics from a folder, or from procedural ground truth."""
    if bool(args.folder) == bool(args.procedural):
        raise ValueError("fid-stats needs a folder of real images or --procedural image|video.")
    if args.procedural:
        real = _procedural_real(args.procedural, args.num, args.seed, args.resolution)
        source = f"procedural-{args.procedural} num={args.num} seed={args.seed} resolution={args.resolution}"
    else:
        real = load_samples(list_samples(args.folder))
        source = str(args.folder)
    stats = metrics.real_statistics(real, features=_features(args))
    stats.save(args.output)
    print(f"wrote {args.output}: {stats.n} samples, features {stats.feature}, from {source}")
    return 0


def fid_command(args) -> int:
    """FID (and KID against a real folder) of generated or given samples."""
    from accelerate import PartialState

    if bool(args.real) == bool(args.real_stats):
        raise ValueError("eval fid needs exactly one of --real DIR or --real-stats FILE.")
    result: dict[str, Any] = {}
    if args.fake:
        files = list_samples(args.fake)
        result["fake"] = str(args.fake)
    else:
        loaded = load_model(args.model, args.device, args.dtype, loras=parse_loras(args.lora, args.lora_2))
        prompts = read_prompts(args.prompts, args.prompt_set, args.num)
        diffaccel.accelerate(loaded.pipe, _accel_spec(args))
        accel = diffaccel.config_of(loaded.pipe)  # what runs on this pipeline (a preset's UNet recipe, its fallbacks)
        job = SampleJob(model=loaded.name, prompts=tuple(prompts), seeds=tuple(args.seed + i for i in range(len(prompts))),
                        accel_config=accel.to_dict(), call_kwargs=_call_kwargs(loaded, args), is_video=loaded.is_video)
        folder = Path(args.samples or Path(args.out).with_suffix("").as_posix() + "_samples")
        state = PartialState()  # one process per local GPU under `accelerate launch`
        generate_samples(job, folder, loaded.pipe, shard=(state.process_index, state.num_processes),
                         progress=state.is_local_main_process)
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        files = list_samples(folder)
        result.update(model=loaded.name, config=accel.to_dict(), samples=str(folder), call=job.call_kwargs)
    fake = load_samples(files)
    features = _features(args)
    if args.real_stats:
        fid = metrics.fid_from_stats(metrics.RealStats.load(args.real_stats), fake, features=features)
        result["real_stats"] = str(args.real_stats)
    else:
        real = load_samples(list_samples(args.real))
        fid = metrics.fid(real, fake, features=features)
        result["kid"] = metrics.kid(real, fake, features=features).to_dict()
        result["real"] = str(args.real)
    result["fid"] = fid.to_dict()
    _write_json(args.out, result)
    print(f"FID {fid.value:.4f} ({fid.feature}, {fid.n_fake} samples) -> {args.out}")
    return 0


def _generate_all(pipe, prompts, seeds, call_kwargs) -> np.ndarray:
    import torch

    out = []
    for prompt, seed in zip(prompts, seeds):
        result = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call_kwargs)
        out.append(pipeline_samples(result)[0])
    return np.stack(out)


def fidelity_command(args) -> int:
    """Accelerated vs baseline on the same prompts and seeds: PSNR / SSIM (/ LPIPS) per sample."""
    loaded = load_model(args.model, args.device, args.dtype, loras=parse_loras(args.lora, args.lora_2))
    prompts = read_prompts(args.prompts, args.prompt_set, args.num)
    seeds = [args.seed + i for i in range(len(prompts))]
    kwargs = _call_kwargs(loaded, args)
    outputs = {}
    for role, spec in (("baseline", args.baseline), ("accelerated", args.config)):
        diffaccel.accelerate(loaded.pipe, spec)
        outputs[role] = _generate_all(loaded.pipe, prompts, seeds, kwargs)
        outputs[role + "_stats"] = diffaccel.stats(loaded.pipe, cumulative=True)
    diffaccel.remove(loaded.pipe)
    scores = metrics.fidelity(outputs["baseline"], outputs["accelerated"])
    result = {"model": loaded.name, "baseline": args.baseline, "config": args.config, "prompts": prompts, "seeds": seeds,
              "call": kwargs, "baseline_stats": outputs["baseline_stats"], "accelerated_stats": outputs["accelerated_stats"],
              "fidelity": scores}
    _write_json(args.out, result)
    summary = ", ".join(f"{k} {v.mean:.4g}" for k, v in scores.items() if hasattr(v, "mean"))
    print(f"fidelity of {args.config} vs {args.baseline}: {summary} -> {args.out}")
    return 0


OFFICIAL_VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering",
                              "motion_smoothness", "dynamic_degree")


def run_official_vbench(clips: np.ndarray, out_dir: Path, device: str) -> dict:
    """The official implementation (needs `vbench`, a CUDA torch and its weights in $VBENCH_CACHE_DIR)."""
    try:
        from vbench import VBench
    except ImportError:
        raise ValueError(
            "--backend vbench needs the official `vbench` package (GPU only) and its model weights in "
            "$VBENCH_CACHE_DIR; use --backend offline for diffaccel's offline implementations."
        ) from None
    import importlib.resources

    from diffaccel.media import save_video

    videos = out_dir / "vbench_videos"
    for i, clip in enumerate(clips):
        save_video(clip, videos / f"clip-{i}.mp4")
    full_info = str(importlib.resources.files("vbench") / "VBench_full_info.json")
    bench = VBench(device, full_info, str(out_dir))
    bench.evaluate(videos_path=str(videos), name="diffaccel", dimension_list=list(OFFICIAL_VBENCH_DIMENSIONS),
                   mode="custom_input")
    return json.loads((out_dir / "diffaccel_eval_results.json").read_text())


def vbench_command(args) -> int:
    """VBench-style dimensions of clips from a folder (.npz / .mp4 / .gif) or generated by a video model."""
    from . import video

    captions = None
    if args.videos:
        clips = _read_clips(args.videos)
        result: dict[str, Any] = {"videos": str(args.videos)}
    else:
        loaded = load_model(args.model, args.device, args.dtype, video=True, loras=parse_loras(args.lora, args.lora_2))
        if not loaded.is_video:
            raise ValueError(f"{loaded.name} is not a video pipeline.")
        prompts = read_prompts(args.prompts, args.prompt_set or "reference-video", args.num)
        diffaccel.accelerate(loaded.pipe, _accel_spec(args))
        clips = _generate_all(loaded.pipe, prompts, [args.seed + i for i in range(len(prompts))], _call_kwargs(loaded, args))
        captions = prompts if loaded.reference == "video" else None  # the judge reads our scenes only
        result = {"model": loaded.name, "config": diffaccel.config_of(loaded.pipe).to_dict(), "prompts": prompts}
    if args.backend == "vbench":
        result["backend"] = "vbench (official)"
        result["dimensions"] = run_official_vbench(clips, Path(args.out).parent, args.device or "cuda")
    else:
        scores = video.evaluate_videos(clips, captions=captions)
        result["dimensions"] = {name: score.to_dict() for name, score in scores.items()}
        for name, score in scores.items():
            print(f"{name}: {score.mean:.4f} ({score.backend})")
    _write_json(args.out, result)
    return 0


def _read_clips(folder: str) -> np.ndarray:
    import imageio.v3 as iio

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".npz", ".mp4", ".gif"))
    if not paths:
        raise ValueError(f"{folder} holds no clips (.npz, .mp4 or .gif).")
    clips = []
    for p in paths:
        if p.suffix == ".npz":
            from .samples import read_sample

            clips.append(read_sample(p))
        else:
            clips.append(np.asarray(iio.imread(p, index=None))[..., :3])
    return np.stack(clips).astype(np.float32) / 255.0


def bench_command(args) -> int:
    """Speed and quality of several configs on one model; report.md/json and two plots."""
    from .bench import add_quality, run_bench, write_report

    loaded = load_model(args.model, args.device, args.dtype, loras=parse_loras(args.lora, args.lora_2))
    prompts = read_prompts(args.prompts, args.prompt_set or ("reference-video" if loaded.is_video else None), args.num)
    configs = []
    for spec in args.configs.split(","):
        spec = spec.strip()
        configs.append((Path(spec).stem if spec.endswith((".json", ".yaml", ".yml")) else spec, spec))
    kwargs = _call_kwargs(loaded, args)
    results, outputs = run_bench(loaded.pipe, configs, prompts, kwargs, repeats=args.repeats, seed=args.seed,
                                 device=args.device or "cpu")
    meta = {"model": loaded.name, "num_prompts": len(prompts), "repeats": args.repeats, "seed": args.seed, "call_kwargs": kwargs}
    # Speed first, and the samples: a failure while scoring quality must not cost the timed runs.
    write_report(results, outputs, args.out, meta)
    from diffaccel.media import to_uint8

    np.savez_compressed(Path(args.out) / "outputs.npz", **{name: to_uint8(x) for name, x in outputs.items()})
    real = None
    if loaded.reference == "image" and len(prompts) >= args.fid_min:
        real = _procedural_real("image", max(len(prompts), 1000), args.seed + 10**6, kwargs.get("height", 64))
    add_quality(results, outputs, prompts, judge_kind=loaded.reference, real=real, fid_min_samples=args.fid_min)
    files = write_report(results, outputs, args.out, meta)
    print(files["report.md"].read_text())
    return 0
