"""The ``diffaccel`` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from typing import Any, Sequence

import numpy as np

from diffaccel.compiling import add_compile_options, compile_denoisers
from diffaccel.lora import add_lora_option, apply_loras, parse_loras

logger = logging.getLogger("diffaccel")


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate an image or video with an accelerated pipeline",
        description="Generate with a diffusers pipeline accelerated by diffaccel; prints what was skipped and the wall time.",
    )
    p.add_argument("prompt", help="text prompt")
    p.add_argument("-o", "--output", required=True, help="output file: .png/.jpg/.webp for images, .mp4/.gif for video")
    p.add_argument(
        "--model",
        default=None,
        help="a diffusers model id or local folder (DiffusionPipeline.from_pretrained), or an embedded model: image, "
        "video, image-lcd / image-rglcd / image-tdm (the image model's 4-, 2- and 4-step students); default: the embedded reference model (image, or video "
        "with --video or an .mp4/.gif output)",
    )
    p.add_argument("--video", action="store_true", help="use the embedded reference video model")
    p.add_argument("--preset", default=None, help="acceleration preset: off, safe, fast, turbo (default: fast)")
    p.add_argument("--config", default=None, help="an AccelConfig saved as .json or .yaml (overrides --preset)")
    p.add_argument("--steps", type=int, default=None, help="number of denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--guidance-2", type=float, default=None,
                   help="guidance scale of the low-noise expert's steps (Wan 2.2's guidance_scale_2; default: --guidance)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="number of frames (video pipelines)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of a written video")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--stats-json", default=None, help="also write the statistics and timing to this JSON file")
    p.add_argument("--upscale", type=int, choices=[2], default=None,
                   help="generate at the model's size, then upscale x2 with the embedded ResShift model "
                   "(4 steps): the cascade, a fraction of the time of generating at twice the size")
    p.add_argument("--upscale-steps", type=int, default=None, help="steps of the upscaler (default: its T, 4)")
    p.add_argument("--distilled", default=None, metavar="DIR",
                   help="a student made by `diffaccel distill` from this model: generate with it (its steps, CFG baked in)")
    add_lora_option(p)
    add_compile_options(p)
    p.set_defaults(func=cmd_generate)


def _add_upscale(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="x2 super-resolution of an image, a folder of images or a video (ResShift, 4 steps)",
        description="Upscale by 2 with the embedded ResShift model (trained at 64 -> 128 px on the reference scenes "
        "and the reference model's outputs). IN is an image (.png/.jpg/.webp), a folder of images (OUT is then "
        "a folder) or a video (.mp4/.gif; every frame gets the same noise, which limits flicker).",
    )
    p.add_argument("input", metavar="IN", help="an image, a folder of images, or a video")
    p.add_argument("-o", "--output", required=True, help="output image, folder, or video (same kind as IN)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps, at most the model's T (default T)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--model", default="upscale",
                   help="embedded 'upscale' (T=4, default) or 'upscale15' (T=15), or a ResShiftPipeline folder")
    p.add_argument("--fps", type=int, default=None, help="frame rate of a written video (default: the input's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_upscale)


def _model_options(p, generating: bool = True) -> None:
    p.add_argument("--model", default=None, help="embedded 'image'/'video' (default) or a diffusers id / folder")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--prompt-set", default=None, help="a named prompt set: reference-image, reference-video")
    p.add_argument("--num", type=int, default=None, help="number of prompts (default: all / 200 for a set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None, help="image/video height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image/video width (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="number of frames (video models)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    add_lora_option(p)
    if generating:
        p.add_argument("--preset", default=None, help="acceleration preset of the generated samples (default off)")
        p.add_argument("--config", default=None, help="an AccelConfig file (.json/.yaml), overrides --preset")


def _feature_options(p) -> None:
    p.add_argument("--features", default="judge", help="judge (offline default), judge-video, or inception")
    p.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity InceptionV3 weights (or $DIFFACCEL_INCEPTION_WEIGHTS)")


def _add_eval(subparsers) -> None:
    from diffaccel.eval import jobs

    p = subparsers.add_parser("eval", help="evaluation jobs: fid, fid-stats, fidelity, vbench")
    sub = p.add_subparsers(dest="eval_command", metavar="JOB", required=True)

    q = sub.add_parser("fid", help="FID (and KID) of generated samples or a folder, resumable")
    _model_options(q)
    _feature_options(q)
    q.add_argument("--fake", default=None, help="a folder of samples to score instead of generating")
    q.add_argument("--samples", default=None, help="where generated samples go (default: next to --out)")
    q.add_argument("--real", default=None, help="a folder of real images")
    q.add_argument("--real-stats", default=None, help="precomputed real statistics (diffaccel eval fid-stats)")
    q.add_argument("--out", required=True, help="result JSON")
    q.set_defaults(func=jobs.fid_command)

    q = sub.add_parser("fid-stats", help="precompute real-set statistics for FID")
    q.add_argument("folder", nargs="?", default=None, help="a folder of real images")
    q.add_argument("--procedural", choices=["image"], default=None, help="use procedural ground truth instead")
    q.add_argument("--num", type=int, default=1000)
    q.add_argument("--seed", type=int, default=10**6)
    q.add_argument("--resolution", type=int, default=64)
    q.add_argument("-o", "--output", required=True, help="statistics file (.npz)")
    _feature_options(q)
    q.set_defaults(func=jobs.fid_stats_command)

    q = sub.add_parser("fidelity", help="accelerated vs baseline on the same prompts and seeds")
    _model_options(q, generating=False)
    q.add_argument("--config", required=True, help="preset name or config file of the accelerated run")
    q.add_argument("--baseline", default="off", help="preset or config of the baseline (default off)")
    q.add_argument("--out", required=True, help="result JSON")
    q.set_defaults(func=jobs.fidelity_command)

    q = sub.add_parser("vbench", help="VBench-style video dimensions of clips or of a video model")
    _model_options(q)
    q.add_argument("--videos", default=None, help="a folder of clips (.npz, .mp4, .gif) instead of generating")
    q.add_argument("--backend", choices=["offline", "vbench"], default="offline",
                   help="offline implementations (default) or the official vbench package when installed")
    q.add_argument("--out", required=True, help="result JSON")
    q.set_defaults(func=jobs.vbench_command)


def _add_bench(subparsers) -> None:
    from diffaccel.eval import jobs

    p = subparsers.add_parser("bench", help="speed and quality of configs side by side; report and plots")
    _model_options(p, generating=False)
    p.add_argument("--configs", default="off,safe,fast,turbo",
                   help="comma-separated presets or config files; the first is the baseline")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fid-min", type=int, default=200, help="compute FID when there are at least this many prompts")
    p.add_argument("--out", required=True, help="output folder: report.md, report.json, two PNGs")
    p.set_defaults(func=jobs.bench_command)


def _add_tune(subparsers) -> None:
    p = subparsers.add_parser("tune", help="fit a method's parameters on baseline runs of a model")
    sub = p.add_subparsers(dest="tune_command", metavar="METHOD", required=True)
    _add_tune_guidance(sub)
    _add_tune_cache(sub)


def _add_tune_cache(sub) -> None:
    from diffaccel.cache.tune import METHODS, tune_cache_command
    from diffaccel.guidance.tune import TUNE_SEED

    q = sub.add_parser(
        "cache",
        help="find the fastest cache setting that meets a PSNR target (or the most faithful at a speedup)",
        description="Runs the model uncached and cached on held-out prompts (the reference scenes from a stream "
        "the evaluation sets do not use, unless --prompts/--prompt-set), searches the method's speed knob and "
        "writes an AccelConfig file (use it with --config). --method auto tries every method but 'schedule' "
        "(a fixed TeaCache plan: which steps compute, searched by hill climbing; slower, asked for by name).",
    )
    _model_options(q, generating=False)
    q.set_defaults(seed=TUNE_SEED)
    q.add_argument("--video", action="store_true", help="use the embedded reference video model")
    q.add_argument("--method", choices=[*METHODS, "auto"], default="auto")
    q.add_argument("--target-psnr", type=float, default=None, help="dB vs the uncached output, mean over prompts")
    q.add_argument("--target-speedup", type=float, default=None, help="x, as fewer block evaluations")
    q.add_argument("--out", required=True, help="the AccelConfig file to write (.json / .yaml)")
    q.set_defaults(func=tune_cache_command)


def _add_tune_guidance(sub) -> None:
    from diffaccel.guidance.tune import TUNE_SEED, tune_guidance_command

    q = sub.add_parser(
        "guidance",
        help="fit LinearAG's coefficients (and pick the AG threshold for a target saving)",
        description="Records plain CFG runs of the model, fits LinearAG's per-step coefficients by least squares "
        "and writes an AccelConfig file (use it with --config). Default prompts: the reference scenes from a "
        "stream the evaluation sets do not use.",
    )
    _model_options(q, generating=False)
    q.set_defaults(seed=TUNE_SEED)
    q.add_argument("--video", action="store_true", help="use the embedded reference video model")
    q.add_argument("--mode", choices=["linear", "ag"], default="linear",
                   help="linear: fit coefficients (default); ag: only pick the threshold (needs --target-saving)")
    q.add_argument("--target-saving", type=float, default=None,
                   help="fraction of denoiser evaluations to save, e.g. 0.3: picks the highest threshold that does")
    q.add_argument("--threshold", type=float, default=None, help="the threshold to keep (without --target-saving)")
    q.add_argument("--min-steps", type=int, default=None)
    q.add_argument("--final-steps", type=int, default=None,
                   help="the last N steps evaluate both branches again (guidance restored at the end)")
    q.add_argument("--refresh-every", type=int, default=None)
    q.add_argument("--out", required=True, help="the AccelConfig file to write (.json / .yaml)")
    q.set_defaults(func=tune_guidance_command)


def _add_farm(subparsers) -> None:
    from diffaccel.parallel.farm import ENGINES, farm_command

    p = subparsers.add_parser(
        "farm",
        help="render many prompts over many devices or nodes, resumably, with a manifest",
        description="Renders every prompt of a file to DIR/<shard>/<id>.png|mp4 (ids hash prompt, seed, model, config "
        "and call), one manifest row per output in DIR/manifest/. A rerun skips finished items and retries failed "
        "ones; DIR/job.json refuses a run with another model, config or call. Under torchrun: "
        "torchrun --nproc_per_node=N -m diffaccel.cli farm ... --engine torchrun.",
    )
    p.add_argument("--model", default=None, help="embedded 'image' (default) or 'video', or a diffusers id / folder")
    p.add_argument("--prompts", required=True,
                   help="prompts.jsonl (one object a line: prompt, optional seed, negative_prompt, num_inference_steps, "
                   "guidance_scale, height, width, num_frames) or a text file (one prompt a line)")
    p.add_argument("--preset", default=None, help="acceleration preset: off, safe, fast, turbo (default: fast)")
    p.add_argument("--config", default=None, help="an AccelConfig saved as .json or .yaml (overrides --preset)")
    p.add_argument("--out", required=True, help="the job folder: outputs, manifest/, job.json, summary.json")
    p.add_argument("--engine", choices=list(ENGINES), default="local",
                   help="local: this process (default); torchrun: one replica per launched process; ray: an actor pool")
    p.add_argument("--workers", type=int, default=None,
                   help="replicas: ray (default one per --devices-per-replica GPUs, 1 on CPU); torchrun takes the "
                   "launcher's process count; local runs 1")
    p.add_argument("--devices-per-replica", type=int, default=1,
                   help="GPUs one pipeline is spread over (device_map='balanced'); 1 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i unless its line sets one")
    p.add_argument("--negative-prompt", default=None, help="negative prompt of items whose line sets none")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="number of frames (video models)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of written videos")
    p.add_argument("--device", default=None, help="torch device of the local/torchrun replica (default: its GPU, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--retries", type=int, default=1, help="more tries of an item that raised, within this run (default 1)")
    p.add_argument("--max-items", type=int, default=None, help="render at most this many of the remaining items")
    p.add_argument("--batch-size", type=int, default=1,
                   help="items per pipeline call, among consecutive items with the same call arguments (default 1). "
                   "More keeps a GPU busier; a batch's caches and adaptive guidance decide for the whole batch, so "
                   "outputs differ slightly from single calls and the batch size is part of the job")
    p.add_argument("--ray-address", default=None, help="a Ray cluster to join (default: one running here, else a new local one)")
    add_lora_option(p)
    add_compile_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=farm_command)


def _add_distill(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="train a few-step student of a model (consistency or trajectory distribution matching), resumably",
        description="Distil a text-to-image or text-to-video teacher (flow-matching, or ε/v-prediction) into a student "
        "that samples in --steps evaluations with CFG baked in (LCD: LoRA with --lora-rank, else every weight with an "
        "EMA target; TDM: data-free, LoRA student and fake score). --out DIR gets a checkpoint every few minutes and a "
        "loadable student (student.json + weights): generate with it through `diffaccel generate --distilled DIR` or "
        "diffaccel.distill.load_student(pipe, DIR).",
    )
    p.add_argument("--method", choices=["lcd", "rg-lcd", "tdm"], default="lcd",
                   help="lcd: latent consistency distillation (LCM); rg-lcd: LCD guided by an expert reward (the "
                   "reference judge's prompt adherence, or --reward-model) through a latent proxy reward model (RG-LCD); "
                   "tdm: trajectory distribution matching (data-free)")
    p.add_argument("--reward-scale", type=float, default=None, help="rg-lcd: β of the −β·R term (default 1, the paper's; on the reference image model 0.25 beat LCD under both judges and 1 did not)")
    p.add_argument("--reward-model", default=None, metavar="ID_OR_PATH",
                   help="rg-lcd: the expert reward, a transformers CLIP model (CLIPScore: openai/clip-vit-large-patch14; "
                   "PickScore); default: the reference judge, which only the reference image teacher can use")
    p.add_argument("--reward-mode", choices=["lrm", "direct"], default=None,
                   help="rg-lcd: optimise the latent proxy (lrm, default) or the judge itself (direct)")
    p.add_argument("--teacher", default="reference:image", help="reference:image (default; the embedded model, trained "
                   "on procedural scenes, which are also its distillation data), reference:video (its clips), or a hub id "
                   "or local folder of a CogView4, Stable Diffusion 3, FLUX.1 [dev], Stable Diffusion 1.x/2.x/XL, PixArt or Wan pipeline (with --data, or --prompts for tdm)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="training images with captions (metadata.jsonl with file_name and text, as Hugging Face "
                   "imagefolder datasets, or NAME.txt beside each image), or for a video teacher clips (.mp4, .gif, "
                   "...) laid out the same way; needed for a teacher of your own")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="tdm: captions alone, one per line (data-free); default: the captions of --data")
    p.add_argument("--resolution", type=int, default=None,
                   help="square training and sampling size in pixels (default: the teacher's)")
    p.add_argument("--height", type=int, default=None, help="training and sampling height, for a size that is not "
                   "square (with --width; default: the teacher's, e.g. Wan's 480 x 832)")
    p.add_argument("--width", type=int, default=None, help="training and sampling width (with --height)")
    p.add_argument("--frames", type=int, default=None,
                   help="a video teacher's clip length (1 + k·the VAE's time factor: 1 + 4k for Wan 2.1, 1 + 2k for the reference model; default: the teacher's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="the teacher's frozen weights (default float32; auto: bfloat16 on a GPU); LoRA adapters train "
                   "in float32 over them; a full student (--lora-rank 0) needs float32")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the transformer's activations in the backward pass: less memory, more time")
    p.add_argument("--steps", type=int, default=4, help="the student's default sampling steps K (default 4)")
    p.add_argument("--out", required=True, help="output folder: a new or empty one, or a run's to --resume")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA student of this rank (lcd default 0: full student; tdm default 16)")
    p.add_argument("--sparse-attention", nargs="?", const="{}", default=None, metavar="JSON",
                   help="tdm: sparsity-aware distillation (Video-BLADE): the student attends with adaptive block-sparse "
                   "attention, the teacher densely; optionally the BlockSparseAttentionConfig fields as JSON, e.g. "
                   "'{\"block_size\": 64, \"max_density\": 0.17}'; the student samples with it")
    p.add_argument("--eta", type=float, default=None, choices=[0.0, 1.0],
                   help="tdm: re-noise between stages with the student's own noise estimate (1, default: Euler "
                   "sampling) or fresh noise (0: LCM-style sampling)")
    p.add_argument("--fake-regulariser", type=float, default=None, metavar="LAMBDA",
                   help="tdm: λ·‖v_fake − v_real‖² added to the fake score's loss (Video-BLADE's --lambda_reg; default 0)")
    p.add_argument("--fake-weighting", default=None, choices=["velocity", "min_snr"],
                   help="tdm: the fake score's loss: velocity MSE (default; the authors' flow-model code) or min_snr, "
                   "x0 MSE x min(SNR, 5) x an importance weight (their DDPM demo for PixArt)")
    p.add_argument("--fake-loss-limit", type=float, default=None, metavar="L",
                   help="tdm: skip a fake-score step whose loss exceeds L (Video-BLADE's guard uses 2.0; default: none)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale baked in (default: the teacher's); with "
                   "--guidance-range, the student's default scale")
    p.add_argument("--guidance-range", default=None, metavar="LOW,HIGH",
                   help="lcd, rg-lcd: give the student LCM's guidance-scale embedding, trained on CFG scales drawn "
                   "uniformly from LOW..HIGH, so it samples at any of them (generate --guidance) in one evaluation a step")
    p.add_argument("--lr", type=float, default=None, help="the student's learning rate (lcd: 5e-4 for a LoRA student, "
                   "1e-5 for a full one; tdm: 1e-4, the fake score 5e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (lcd), 8 (tdm)")
    p.add_argument("--solver-steps", type=int, default=None, help="lcd: the teacher's ODE grid (default 50, as LCD)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this many optimiser steps in total")
    p.add_argument("--save-every", type=float, default=3.0, help="minutes between checkpoints (default 3)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_option(p)  # fused into the teacher: the student learns the LoRA'd model and needs it where it samples
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from diffaccel.distill import LCDConfig, RewardConfig, TDMConfig, distill

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise ValueError("Give --resolution (a square) or --height and --width, not both.")
    if (args.height is None) != (args.width is None):
        raise ValueError("--height and --width go together: give both (or --resolution for a square).")
    height, width = (args.resolution, args.resolution) if args.resolution is not None else (args.height, args.width)
    given = {k: v for k, v in (("lora_rank", args.lora_rank), ("learning_rate", args.lr),
                               ("batch_size", args.batch_size), ("height", height),
                               ("width", width), ("frames", args.frames)) if v is not None}
    if args.guidance_range is not None:
        if args.method == "tdm":
            raise ValueError("--guidance-range is an option of the consistency methods (lcd, rg-lcd), not tdm.")
        try:
            low, high = (float(x) for x in args.guidance_range.split(","))
        except ValueError:
            raise ValueError(f"--guidance-range {args.guidance_range!r}: give two CFG scales, LOW,HIGH (e.g. 2,8).") from None
        given["guidance_range"] = (low, high)
    if args.method == "tdm":
        if args.solver_steps is not None:
            raise ValueError("--solver-steps is an option of the consistency methods (lcd, rg-lcd), not tdm.")
        if args.sparse_attention is not None:
            try:
                given["sparse_attention"] = json.loads(args.sparse_attention)
            except json.JSONDecodeError as error:
                raise ValueError(f"--sparse-attention {args.sparse_attention!r} is not JSON ({error.msg}); give the "
                                 f"BlockSparseAttentionConfig fields, e.g. '{{\"block_size\": 64}}'.") from None
        tdm_only = {k: v for k, v in (("eta", args.eta), ("fake_regulariser", args.fake_regulariser),
                                      ("fake_loss_limit", args.fake_loss_limit),
                                      ("fake_weighting", args.fake_weighting)) if v is not None}
        config = TDMConfig(student_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, **tdm_only, **given)
    else:
        for option, value in (("--eta", args.eta), ("--fake-regulariser", args.fake_regulariser),
                              ("--fake-loss-limit", args.fake_loss_limit), ("--fake-weighting", args.fake_weighting)):
            if value is not None:
                raise ValueError(f"{option} is an option of --method tdm.")
        if args.sparse_attention is not None:
            raise ValueError("--sparse-attention is an option of --method tdm (Video-BLADE's sparsity-aware TDM).")
        rank = given.get("lora_rank", 0)
        config = LCDConfig(**{"learning_rate": 5e-4 if rank else 1e-5, **given}, student_steps=args.steps,
                           solver_steps=args.solver_steps or 50, guidance_scale=args.guidance, seed=args.seed)
    reward = None
    if args.method == "rg-lcd":
        reward = RewardConfig(**{k: v for k, v in (("reward_scale", args.reward_scale), ("mode", args.reward_mode),
                                                   ("expert", args.reward_model)) if v is not None})
    elif args.reward_scale is not None or args.reward_mode is not None or args.reward_model is not None:
        raise ValueError("--reward-scale, --reward-mode and --reward-model are options of --method rg-lcd.")
    if args.prompts is not None and args.method != "tdm":
        raise ValueError(f"--prompts is for --method tdm (data-free); {args.method} needs training images (--data DIR).")
    if args.prompts is not None and args.data is not None:
        raise ValueError("Give --data DIR or --prompts FILE, not both (tdm reads only the captions of --data).")
    data = args.prompts if args.prompts is not None else args.data
    start = time.perf_counter()
    loras = parse_loras(args.lora, args.lora_2)  # a missing LoRA file fails before the teacher loads
    out = distill(args.teacher, args.out, config, method=args.method, reward=reward, data=data, dtype=args.dtype,
                  loras=loras,
                  gradient_checkpointing=args.gradient_checkpointing, max_minutes=args.max_minutes,
                  max_steps=args.max_steps, resume=args.resume, save_every=args.save_every,
                  progress=not args.no_progress)
    print(f"wrote the student to {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffaccel",
        description="Make diffusers pipelines faster (feature caching and more) and measure what it costs.",
    )
    from diffaccel import __version__

    parser.add_argument("--version", action="version", version=f"diffaccel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(subparsers)
    _add_upscale(subparsers)
    _add_eval(subparsers)
    _add_bench(subparsers)
    _add_tune(subparsers)
    _add_farm(subparsers)
    _add_distill(subparsers)
    return parser


def reference_name(args: argparse.Namespace) -> str | None:
    """Which embedded model to use when no --model is given."""
    from diffaccel.media import VIDEO_SUFFIXES

    if args.model is not None:
        if args.video:
            raise ValueError("--video selects the embedded video model; with --model the pipeline decides.")
        return None
    return "video" if args.video or str(args.output).lower().endswith(VIDEO_SUFFIXES) else "image"


def call_arguments(pipe: Any, args: argparse.Namespace, defaults: dict | None = None) -> dict:
    """The pipeline call: the user's options over the model's defaults; unsupported ones are refused."""
    import torch

    accepted = inspect.signature(pipe.__call__).parameters
    wanted = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_scale_2": getattr(args, "guidance_2", None),
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
    }
    kwargs = dict(defaults or {})
    for name, value in wanted.items():
        if value is None:
            continue
        if name == "guidance_scale" and name not in accepted and _set_guider_scale(pipe, value):
            continue
        if name not in accepted:
            raise ValueError(f"{type(pipe).__name__} does not take {name!r}; drop that option.")
        kwargs[name] = value
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    kwargs["output_type"] = "np"
    return kwargs


def _set_guider_scale(pipe: Any, scale: float) -> bool:
    """Pipelines that guide through a diffusers guider component (HunyuanVideo 1.5) take the scale there,
    not as a call argument: swap in the same guider at ``scale``. False where the pipeline has none."""
    guider = getattr(pipe, "guider", None)
    if guider is None or "guidance_scale" not in getattr(guider, "config", {}):
        return False
    pipe.guider = guider.new(guidance_scale=scale)
    logger.info("diffaccel: %s guides through its %s; set its guidance_scale to %s",
                type(pipe).__name__, type(guider).__name__, scale)
    return True


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import diffaccel
    from diffaccel.loading import load_model
    from diffaccel.media import check_output_path, pipeline_samples, save_image, save_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = args.config if args.config else (args.preset or "fast")
    diffaccel.resolve_config(config)  # fail on a bad preset/config before loading a model
    loras = parse_loras(args.lora, args.lora_2)  # a missing LoRA file fails here too

    reference = reference_name(args)
    if reference is not None:
        from diffaccel.pipelines import reference as embedded

        check_output_path(args.output, embedded.info(reference)["is_video"])  # before loading anything
    loaded = load_model(reference or args.model, device, args.dtype)
    pipe, video = loaded.pipe, loaded.is_video
    defaults = loaded.defaults
    if args.distilled:
        from diffaccel.distill import StudentCard, load_student, set_student_guidance, student_call_defaults, student_of

        if StudentCard.load(args.distilled).teacher_loras:  # distilled on a LoRA'd teacher: the same LoRAs first
            apply_loras(pipe, loras)
            loras = ()
        load_student(pipe, args.distilled)
        defaults = {**defaults, **student_call_defaults(pipe)}
        config = with_student_attention(config, pipe)
        if args.guidance is not None and student_of(pipe).guidance_embedding:
            set_student_guidance(pipe, args.guidance)  # the scale it embeds; the call itself stays at guidance 1
            args = argparse.Namespace(**{**vars(args), "guidance": None})
    # after a student, whose full weights would replace them: a style LoRA goes on top of the few-step model
    apply_loras(pipe, loras)
    pipe.set_progress_bar_config(disable=False)
    output_path = check_output_path(args.output, video)
    diffaccel.accelerate(pipe, config)  # by name: a preset's UNet recipe on a UNet
    compiled = compile_denoisers(pipe, args.compile, backend=args.compile_backend)
    kwargs = call_arguments(pipe, args, defaults)
    # Schedulers that draw fresh noise between steps (a student's FlowMatchLCMScheduler) get no generator
    # from the pipeline: seeding the global one too makes the output repeatable.
    torch.manual_seed(args.seed)

    upscaler = load_upscaler("upscale", device) if args.upscale else None

    start = time.perf_counter()
    result = pipe(**kwargs)
    samples = pipeline_samples(result, video)
    frames = samples[0] if video else samples[:1]
    generated = time.perf_counter() - start
    if upscaler is not None:
        frames = upscale_frames(upscaler, frames, args.upscale_steps, args.seed, share_noise=video)
    wall = time.perf_counter() - start

    if video:
        save_video(frames, output_path, fps=args.fps)
    else:
        save_image(frames[0], output_path)
    report = {"output": str(output_path), "wall_seconds": round(wall, 3), "stats": diffaccel.stats(pipe)}
    if compiled:
        report["compiled"] = compiled  # the first call compiles: its wall time includes that
    if upscaler is not None:
        report["generate_seconds"] = round(generated, 3)
        report["upscale_seconds"] = round(wall - generated, 3)
        print(f"generated {frames.shape[-3] // 2}x{frames.shape[-2] // 2} px in {generated:.2f} s, upscaled x2 in "
              f"{wall - generated:.2f} s")
    print(f"wrote {output_path} in {wall:.2f} s" + (" (compiling included)" if compiled else ""))
    print(json.dumps(report["stats"], indent=2))
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def with_student_attention(config: Any, pipe: Any) -> Any:
    """The acceleration config, plus the block-sparse attention a sparsity-aware student was trained with
    when the config itself chooses no attention method."""
    import diffaccel
    from diffaccel.distill.student import student_attention, student_of

    attention = student_attention(student_of(pipe))
    if attention is None:
        return config
    resolved = diffaccel.resolve_config(config, pipe=pipe)
    if resolved.attention is not None:
        logger.warning("diffaccel: the student was trained with block-sparse attention; this config's %s attention "
                       "replaces it", resolved.attention.method)
        return resolved
    logger.info("diffaccel: the student attends with the block-sparse attention it was trained with")
    return resolved.with_methods(attention=attention)


def load_upscaler(spec: str, device: str | None):
    """The embedded 'upscale' / 'upscale15' ResShift pipeline, or a ResShiftPipeline folder."""
    import torch

    from diffaccel.pipelines import reference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec in reference.UPSCALERS:
        return reference.load(spec, device=device)
    from pathlib import Path

    from diffaccel.pipelines.restoration import ResShiftPipeline

    if not (Path(spec) / "model_index.json").is_file():
        raise ValueError(f"--model {spec!r} is neither {list(reference.UPSCALERS)} nor a ResShiftPipeline folder.")
    pipe = ResShiftPipeline.from_pretrained(spec).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


UPSCALE_CHUNK = 16  # frames per upscaler call (and per read of a video)


def upscale_frames(pipe, frames: np.ndarray, steps: int | None, seed: int, share_noise: bool,
                   chunk: int = UPSCALE_CHUNK) -> np.ndarray:
    """(N, h, w, 3) in [0, 1] or uint8 -> (N, 2h, 2w, 3) float in [0, 1]. share_noise: one clip (the same
    noise on every frame: each chunk reseeds the generator, so the noise is the same across chunks)."""
    import torch

    out = []
    for i in range(0, len(frames), chunk):
        part = frames[i : i + chunk]
        if share_noise:
            gen = torch.Generator("cpu").manual_seed(seed)
            result = pipe(frames=list(part), num_inference_steps=steps, generator=gen, output_type="np")
        else:
            gens = [torch.Generator("cpu").manual_seed(seed + i + k) for k in range(len(part))]
            result = pipe(image=list(part), num_inference_steps=steps, generator=gens, output_type="np")
        out.append(result.images)
    return np.concatenate(out)


def cmd_upscale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffaccel.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoWriter, iter_video_chunks, save_image, video_fps

    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise ValueError(f"Input {source} does not exist.")
    kind = "folder" if source.is_dir() else ("video" if source.suffix.lower() in VIDEO_SUFFIXES else "image")
    if kind == "image" and source.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"Input {source.name}: upscale reads images {IMAGE_SUFFIXES}, videos {VIDEO_SUFFIXES} or a folder.")
    wanted = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}.get(kind)
    if wanted is not None and target.suffix.lower() not in wanted:
        raise ValueError(f"The input is {'an' if kind == 'image' else 'a'} {kind}: write to one of {wanted}, not {target.name!r}.")
    if kind == "folder" and target.suffix:
        raise ValueError(f"The input is a folder: -o must be a folder too, not {target.name!r}.")
    if kind == "folder":
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {source}.")
    pipe = load_upscaler(args.model, args.device)
    start = time.perf_counter()
    if kind == "video":
        count = 0
        # Chunk by chunk, read and written as streams: a long video never sits in memory whole. Each chunk
        # reseeds the noise, so every frame gets the same noise, as in one call.
        with VideoWriter(target, fps=args.fps or video_fps(source)) as writer:
            for frames in iter_video_chunks(source, UPSCALE_CHUNK):
                big = upscale_frames(pipe, frames, args.steps, args.seed, share_noise=True, chunk=UPSCALE_CHUNK)
                writer.append(big)
                count += len(frames)
        if not count:
            raise ValueError(f"{source.name} holds no frames.")
        done = f"{count} frames {frames.shape[2]}x{frames.shape[1]} -> {big.shape[2]}x{big.shape[1]} px"
    else:
        from PIL import Image

        files = files if kind == "folder" else [source]
        for path in files:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            big = upscale_frames(pipe, pixels[None], args.steps, args.seed, share_noise=False)[0]
            save_image(big, target / path.name if kind == "folder" else target)
        done = f"{len(files)} image{'s' if len(files) > 1 else ''}"
    print(f"wrote {target} ({done}) in {time.perf_counter() - start:.2f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as error:
        print(f"diffaccel: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
