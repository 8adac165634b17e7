"""Train the x2 super-resolution models (64 -> 128 px) of the ResShift benchmark on a CPU.

    python scripts/train_resshift.py cache --split train --num 160    # reference-model outputs, once
    python scripts/train_resshift.py cache --split heldout --num 200  # the bench's second test set
    python scripts/train_resshift.py resshift4 --minutes 25           # T=4 (journal settings) -> "upscale"
    python scripts/train_resshift.py resshift15 --minutes 20          # T=15 (NeurIPS settings) -> "upscale15"
    python scripts/train_resshift.py flow --minutes 20                # baseline: flow matching from pure noise
    python scripts/train_resshift.py regression --minutes 10          # baseline: one-step regression
    python scripts/train_resshift.py resshift4 --minutes 10 --resume  # continue from the last checkpoint

Every variant trains the same network (``models.make_unet``: a 1.7M-parameter ``UNet2DModel`` on 2x2
space-to-depth pixels, x_t ⊕ the bicubic-upsampled LR image in) with the same x0 loss (MSE + 0.05
gradient-L1 + 0.01 FFT-L1), batch, optimiser and data; only the chain differs. Data: 64 HR
crops of 32 px a step (80% of them placed on an edge) of procedural scenes rendered at 128 px (fresh
every step) and, for ``--ref-share`` of each batch, of the reference image model's own 128 px outputs (``cache``; flipped / rotated), degraded
by ``data.degrade`` (bicubic down x2, noise with p=0.3; ``DEGRADATION``).

Checkpoints (full state) go to ``work/resshift/<variant>/checkpoint.pt`` every ``--save-every``
minutes; the EMA weights are exported (float16 safetensors): ``upscale`` (resshift4) and ``upscale15`` (resshift15) as
``ResShiftPipeline`` folders in ``pipelines/reference/weights/``; the bench baselines as ``UNet2DModel``
folders in ``scripts/weights/upscale_baselines/{flow,regression}`` (used by the bench only, so not installed). One thread by default (``--threads``).
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "resshift"
CACHE = ROOT / "work" / "resshift_cache"
WEIGHTS = ROOT / "pipelines" / "reference" / "weights"
BASELINE_WEIGHTS = ROOT / "scripts" / "weights" / "upscale_baselines"  # bench baselines: not installed, not shipped

from diffaccel.pipelines.restoration import data  # noqa: E402
from diffaccel.pipelines.restoration.baselines import FLOW_TIME_SCALE, flow_interpolate  # noqa: E402
from diffaccel.pipelines.restoration.models import condition, make_unet, param_count, sr_forward, sr_loss  # noqa: E402
from diffaccel.sampling.resshift import ResShiftScheduler  # noqa: E402

# The two ResShift settings: NeurIPS (T=15) and journal (T=4); pixel-space input normalisation and the
# residual form of x0-prediction (x0 = y - output) for every variant.
SCHEDULERS = {
    "resshift15": dict(num_train_timesteps=15, kappa=2.0, p=0.3, min_noise_level=0.04, etas_end=0.99),
    "resshift4": dict(num_train_timesteps=4, kappa=2.0, p=0.3, min_noise_level=0.2, etas_end=0.99),
}
VARIANTS = ("resshift4", "resshift15", "flow", "regression")
EXPORT = {
    "resshift4": WEIGHTS / "upscale",
    "resshift15": WEIGHTS / "upscale15",
    "flow": BASELINE_WEIGHTS / "flow",
    "regression": BASELINE_WEIGHTS / "regression",
}
FACTOR = 2
HR_SIZE = 128
# Training degradation: bicubic x2 downsample, then Gaussian noise (p=0.3, std <= 0.01); the benchmark's LR
# images are the plain bicubic downsample. Extra blur before the downsample (data.Degradation.blur_prob) is
# off: with it the model learns to sharpen every soft edge, and the reference model's outputs are soft at
# 128 px themselves (measured: 5 dB below bicubic on them after 300 steps with blur p=0.3, ref share 0.3).
DEGRADATION = data.Degradation(factor=FACTOR, blur_prob=0.0, noise_prob=0.3, noise_std=(0.0, 0.01))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_scheduler(variant: str, **overrides) -> ResShiftScheduler:
    """The variant's chain; ``overrides`` (kappa, min_noise_level) for experiments that depart from the paper."""
    settings = {**SCHEDULERS[variant], **{k: v for k, v in overrides.items() if v is not None}}
    return ResShiftScheduler(**settings, prediction_type="residual", input_normalization="pixel")


# ------------------------------------------------------------------------------------------ data


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    if rng.random() < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(rng.integers(4)), dims=(-2, -1))


def _edge_crop(img: torch.Tensor, crop: int, rng: np.random.Generator, edge_share: float) -> torch.Tensor:
    """A crop (aligned to the scale factor) that, with probability ``edge_share``, contains a random edge
    pixel (where the colour changes): flat regions teach an upscaler nothing."""
    limit = (HR_SIZE - crop) // FACTOR
    if rng.random() < edge_share:
        edges = ((img[:, :, 1:] - img[:, :, :-1]).abs().sum(0)[:-1, :] + (img[:, 1:, :] - img[:, :-1, :]).abs().sum(0)[:, :-1]) > 0.05
        ys, xs = np.nonzero(edges.numpy())
        if len(ys):
            k = int(rng.integers(len(ys)))
            cy, cx = int(ys[k]) - int(rng.integers(crop)), int(xs[k]) - int(rng.integers(crop))
            i, j = (min(max(v // FACTOR, 0), limit) * FACTOR for v in (cy, cx))
            return img[:, i : i + crop, j : j + crop]
    i, j = (int(v) * FACTOR for v in rng.integers(0, limit + 1, size=2))
    return img[:, i : i + crop, j : j + crop]


def batch(rng: np.random.Generator, n: int, crop: int, ref: torch.Tensor | None, ref_share: float,
          edge_share: float = 0.8):
    """(HR crops in [-1, 1], y = upsampled degraded LR in [-1, 1]), both (n, 3, crop, crop)."""
    n_ref = int(round(n * ref_share)) if ref is not None and len(ref) else 0
    n_scenes = n - n_ref
    hr, _ = data.procedural_hr(rng, max(1, (n_scenes + 1) // 2), HR_SIZE)  # two crops per rendered scene
    parts = [hr.repeat_interleave(2, dim=0)[:n_scenes]]
    if n_ref:
        idx = rng.integers(len(ref), size=n_ref)
        parts.append(torch.stack([_augment(ref[i], rng) for i in idx]))
    hr = torch.stack([_edge_crop(img, crop, rng, edge_share) for img in torch.cat(parts)])
    lr = data.degrade(hr, rng, DEGRADATION)
    return hr * 2 - 1, condition(lr, FACTOR)


# ------------------------------------------------------------------------------------------ losses


def sample_indices(n: int, num_timesteps: int, last_step_share: float, gen: torch.Generator) -> torch.Tensor:
    """Chain indices of a batch: uniform (the paper), with ``last_step_share`` of them pinned to index 0.

    The sampler returns the x0 prediction made at index 0 as the image, so that prediction alone sets
    the output's error; pinning part of each batch there spends more of the budget where it counts.
    """
    t = torch.randint(0, num_timesteps, (n,), generator=gen)
    if last_step_share <= 0:  # the paper's sampling, with the generator stream of earlier runs
        return t
    pinned = torch.rand(n, generator=gen) < last_step_share
    return torch.where(pinned, torch.zeros_like(t), t)


def training_loss(variant: str, unet, scheduler, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                  last_step_share: float = 0.0):
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if variant in SCHEDULERS:
        t = sample_indices(n, scheduler.config.num_train_timesteps, last_step_share, gen)
        x_t = scheduler.add_noise(x0, y, noise, t)
        out = sr_forward(unet, scheduler.scale_model_input(x_t, t), y, t)
        pred = y - out  # x0 in the residual form, unclipped so that the gradient flows
    elif variant == "flow":
        s = torch.rand(n, generator=gen)
        x_s = flow_interpolate(x0, noise, s)
        pred = y - sr_forward(unet, x_s, y, s * FLOW_TIME_SCALE)
    else:
        pred = y - sr_forward(unet, y, y, torch.zeros(n))
    return sr_loss(pred, x0)


# ------------------------------------------------------------------------------------------ export


def export(variant: str, unet, state: dict, folder: Path | None = None, scheduler=None) -> Path:
    folder = folder or EXPORT[variant]
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 cast warns that no module needs fp32 (none does)
    try:
        half = copy.deepcopy(unet).to(torch.float16)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if variant in SCHEDULERS:
        from diffaccel.pipelines.restoration import ResShiftPipeline

        pipe = ResShiftPipeline(unet=half, scheduler=scheduler or make_scheduler(variant), scale_factor=FACTOR)
        pipe.save_pretrained(folder)
        state_path = folder / "unet" / "training_state.json"
    else:
        half.save_pretrained(folder)
        state_path = folder / "training_state.json"
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ training


def train(args) -> None:
    from tqdm import tqdm

    variant = args.variant
    work = Path(args.out) if args.out else WORK / variant
    export_folder = work / "export" if args.out else None  # experiments never overwrite the shipped weights
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    torch.manual_seed(args.seed)
    unet = make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    if (args.kappa or args.min_noise_level) and variant not in SCHEDULERS:
        raise SystemExit(f"--kappa / --min-noise-level apply to the ResShift variants, not {variant}.")
    if (args.kappa or args.min_noise_level) and not args.out:
        raise SystemExit("--kappa / --min-noise-level depart from the paper's settings: give --out DIR so the "
                         "shipped weights are not overwritten.")
    scheduler = make_scheduler(variant, kappa=args.kappa, min_noise_level=args.min_noise_level) \
        if variant in SCHEDULERS else None
    steps, minutes_before, losses = 0, 0.0, []
    if args.resume:
        if not checkpoint.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}; run without --resume to start.")
        saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
        unet.load_state_dict(saved["unet"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        steps, minutes_before, losses = saved["steps"], saved["minutes"], saved["losses"]
        log(f"resuming {variant} from step {steps} ({minutes_before:.1f} min)")
    ref = None
    if args.ref_share > 0:
        ref, _, _ = data.load_cache(CACHE, "train", HR_SIZE)
        log(f"{len(ref)} reference-model outputs, {args.ref_share:.0%} of each batch")
    log(f"{variant}: UNet2DModel {param_count(unet) / 1e6:.2f}M params, batch {args.batch_size} x {args.crop} px crops, "
        f"{args.minutes} min, {torch.get_num_threads()} thread(s)")
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + steps)
    rng = np.random.default_rng([args.seed, steps])
    deadline = T0 + args.minutes * 60
    start = time.time()
    last_save = start

    def state() -> dict:
        return {
            "variant": variant, "steps": steps, "minutes": round(minutes_before + (time.time() - start) / 60, 2),
            "last_step_share": args.last_step_share,
            **({"scheduler": dict(scheduler.config)} if scheduler is not None else {}),
            "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "ema": args.ema, "ref_share": args.ref_share,
            "params": param_count(unet), "loss_last_200": round(float(np.mean([l[0] for l in losses[-200:]] or [0])), 5),
            "mse_last_200": round(float(np.mean([l[1] for l in losses[-200:]] or [0])), 6),
            "threads": torch.get_num_threads(),
        }

    def save() -> None:
        s = state()
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "steps": steps,
                    "minutes": s["minutes"], "losses": losses}, tmp)
        tmp.replace(checkpoint)
        folder = export(variant, ema, s, export_folder, scheduler)
        log(f"checkpoint at step {steps} ({s['minutes']:.1f} min), loss {s['loss_last_200']:.4f}, exported to {folder}")

    bar = tqdm(total=int(args.minutes * 60), unit="s", mininterval=10 if sys.stderr.isatty() else 60,
               desc=variant, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{postfix}]")
    unet.train()
    run_steps = 0
    while time.time() < deadline - 20 and (args.max_steps is None or steps < args.max_steps):  # final save
        frac = (time.time() - start) / max(deadline - start, 1)
        if args.max_steps:  # a step budget sets the schedule, so equal-step runs decay alike
            frac = max(frac, steps / args.max_steps)
        lr = args.lr * min(1.0, (steps + 1) / 100) * (1.0 if frac < 0.7 else max(0.1, 1 - (frac - 0.7) / 0.3))
        for g in opt.param_groups:
            g["lr"] = lr
        x0, y = batch(rng, args.batch_size, args.crop, ref, args.ref_share)
        loss, parts = training_loss(variant, unet, scheduler, x0, y, gen, args.last_step_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + run_steps) / (10 + run_steps))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        steps += 1
        run_steps += 1
        losses.append((float(loss), parts["mse"]))
        bar.n = int(time.time() - start)
        bar.set_postfix_str(f"step {steps} loss {np.mean([l[0] for l in losses[-50:]]):.4f} lr {lr:.1e}", refresh=False)
        bar.update(0)
        if time.time() - last_save > args.save_every * 60:
            save()
            last_save = time.time()
    bar.close()
    save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=(*VARIANTS, "cache"))
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of this run, final save included")
    parser.add_argument("--resume", action="store_true", help="continue from work/resshift/<variant>/checkpoint.pt")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop", type=int, default=32, help="HR crop size in px (multiple of 8)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this many optimiser steps (equal-budget runs)")
    parser.add_argument("--last-step-share", type=float, default=0.0,
                        help="ResShift: share of each batch trained at chain index 0, whose x0 prediction is the output")
    parser.add_argument("--kappa", type=float, default=None, help="ResShift: κ instead of the paper's 2.0 (needs --out)")
    parser.add_argument("--min-noise-level", type=float, default=None,
                        help="ResShift: the last step's noise std instead of the paper's (needs --out)")
    parser.add_argument("--out", default=None, help="work and export folder of an experiment (default: "
                        "work/resshift/<variant>, exported to the shipped weights)")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--ref-share", type=float, default=0.5, help="share of each batch from reference-model outputs")
    parser.add_argument("--save-every", type=float, default=3.0, help="minutes between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "heldout"], default="train", help="cache: which set")
    parser.add_argument("--num", type=int, default=None, help="cache: number of outputs (train 160, heldout 200)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant == "cache":
        n = args.num or (160 if args.split == "train" else 200)
        data.make_cache(CACHE, args.split, n, HR_SIZE, log=log)
        return 0
    if args.crop % 8 or not 8 <= args.crop <= HR_SIZE:
        raise SystemExit(f"--crop must be a multiple of 8 in [8, {HR_SIZE}], got {args.crop}.")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
