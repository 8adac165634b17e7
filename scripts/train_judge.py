"""Train the judges (``diffaccel.pipelines.reference.judge``) on procedural scenes, CPU, one thread.

    python scripts/train_judge.py --kind both --minutes 12

Every step draws a fresh batch from ``scenes.sample_batch`` (images at 64 or 128 px, clips at 64 px
with 9 frames), degrades it the way a small diffusion model's output is degraded (blur, noise,
low-frequency blotches, brightness/contrast jitter, color shifts), and trains every head with
cross-entropy. A held-out set (its own seed) is scored now and then; training stops once held-out
adherence on clean renders reaches ``target`` (99.5%) with every attribute at least ``attr_target``
(99.5%) and adherence on degraded renders at least ``aug_target`` (99%), or at ``max_minutes``; then
the weights are saved next to a JSON config (which records the run and its held-out accuracies).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffaccel.pipelines.reference import judge as J
from diffaccel.pipelines.reference import scenes

HELDOUT_SEED = 90_210  # the tests use the same stream: never a training seed
IMAGE_RESOLUTIONS = (64, 128)
CLIP_RESOLUTION = 64
CLIP_FRAMES = 9


# ------------------------------------------------------------------------------------------ augmentations


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with a per-sample sigma (N,) in pixels; sigma 0: identity."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (N, K); tiny sigma -> a delta
    k = k.repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def augment(x: torch.Tensor, rng: torch.Generator, p_clean: float = 0.15) -> torch.Tensor:
    """Degrade (B, 3, H, W) images or (B, F, 3, H, W) clips in [0, 1]; a clip shares its color
    and blur parameters across frames, noise is drawn per frame. A ``p_clean`` share is left as is."""
    clip = x.ndim == 5
    b = x.shape[0]
    frames = x.shape[1] if clip else 1
    h = x.shape[-1]
    flat = x.reshape(b * frames, 3, x.shape[-2], h)

    def per_sample(*shape, low=0.0, high=1.0):
        v = low + (high - low) * torch.rand(b, *shape, generator=rng)
        return v.repeat_interleave(frames, dim=0)

    def per_frame(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(b * frames, *shape, generator=rng)

    keep = per_sample(low=0, high=1) < p_clean
    y = flat
    # blur: sigma up to ~1.1 px at 64 px (scaled with the resolution), half of the samples
    sigma = per_sample(low=0.2, high=1.1) * (h / 64) * (per_sample() < 0.5)
    if float(sigma.max()) > 0:
        y = _gaussian_blur(y, sigma)
    # contrast about the per-image mean, brightness, per-channel gain and offset
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * per_sample(1, 1, 1, low=0.85, high=1.15) + mean
    y = y + per_sample(1, 1, 1, low=-0.06, high=0.06)
    y = y * per_sample(3, 1, 1, low=0.94, high=1.06) + per_sample(3, 1, 1, low=-0.04, high=0.04)
    # low-frequency blotches (4x4 .. 8x8 noise upsampled), half of the samples
    grid = int(torch.randint(4, 9, (1,), generator=rng))
    blotch = torch.randn(b, 3, grid, grid, generator=rng).repeat_interleave(frames, dim=0)
    blotch = F.interpolate(blotch, size=y.shape[-2:], mode="bicubic", align_corners=False)
    y = y + blotch * per_sample(1, 1, 1, low=0.0, high=0.04) * (per_sample(1, 1, 1) < 0.5)
    # white noise, per frame
    y = y + torch.randn(y.shape, generator=rng) * per_sample(1, 1, 1, low=0.0, high=0.06)
    y = torch.where(keep.view(-1, 1, 1, 1), flat, y).clamp(0.0, 1.0)
    return y.view_as(x)


def _drop_frames(x: torch.Tensor, rng: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Sometimes keep only 5..8 of the 9 frames (first and last kept), as a model with another frame
    count would show the same motion; the judge resamples them back to 9."""
    if float(torch.rand(1, generator=rng)) >= p:
        return x
    keep = int(torch.randint(5, x.shape[1], (1,), generator=rng))
    idx = torch.linspace(0, x.shape[1] - 1, keep).round().long()
    return x[:, idx]


# ------------------------------------------------------------------------------------------ data


def _to_torch(pixels: np.ndarray, clip: bool) -> torch.Tensor:
    x = torch.from_numpy(pixels)
    return x.permute(0, 1, 4, 2, 3).contiguous() if clip else x.permute(0, 3, 1, 2).contiguous()


def heldout_set(kind: str, n: int, resolution: int, seed: int = HELDOUT_SEED):
    """Held-out ground truth: (pixels channels-first tensor, captions)."""
    clip = kind == "video"
    rng = np.random.default_rng([seed, resolution, int(clip)])
    pixels, captions, _ = scenes.sample_batch(rng, n, resolution, clip=clip, frames=CLIP_FRAMES)
    return _to_torch(pixels, clip), captions


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in acc.items())


def evaluate(model, kind: str, sets, rng: torch.Generator) -> dict[str, dict[str, float]]:
    out = {}
    for name, (x, captions) in sets.items():
        out[name] = J.attribute_accuracy(model, x, captions)
        out[name + "+aug"] = J.attribute_accuracy(model, augment(x, rng, p_clean=0.0), captions)
    return out


# ------------------------------------------------------------------------------------------ training


def train_judge(
    kind: str,
    out_path: str | Path | None = None,
    seed: int = 0,
    max_minutes: float = 12.0,
    batch_size: int | None = None,
    lr: float = 2e-3,
    target: float = 0.995,
    aug_target: float = 0.99,
    attr_target: float = 0.995,
    eval_every_s: float = 45.0,
    min_minutes: float = 0.0,
    threads: int = 1,
) -> dict:
    """Train a judge of ``kind`` ("image" | "video") and save it to ``out_path`` (default: the
    shipped location). Returns a summary (minutes, steps, samples, held-out accuracies)."""
    if kind not in J.KINDS:
        raise ValueError(f"kind must be one of {J.KINDS}, got {kind!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    clip = kind == "video"
    batch_size = batch_size or (32 if clip else 64)
    out_path = Path(out_path) if out_path is not None else J.default_path(kind)
    model = J.ClipJudge() if clip else J.ImageJudge()
    n_params = J.param_count(model)
    print(f"[{kind}] {type(model).__name__}: {n_params:,} params ({n_params * 4 / 2**20:.2f} MB float32), batch {batch_size}", flush=True)

    if clip:
        sets = {"clips@64": heldout_set(kind, 512, CLIP_RESOLUTION)}
    else:
        sets = {f"images@{r}": heldout_set(kind, 512, r) for r in IMAGE_RESOLUTIONS}
    attributes = J.CLIP_ATTRIBUTES if clip else J.IMAGE_ATTRIBUTES

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    data_rng = np.random.default_rng(seed)
    aug_rng = torch.Generator().manual_seed(seed + 1)
    eval_rng = torch.Generator().manual_seed(HELDOUT_SEED)
    budget = max_minutes * 60.0
    start_wall, start_cpu = time.time(), time.process_time()
    last_eval = last_print = start_wall
    step = samples = 0
    loss_ema = None
    result = None
    while True:
        elapsed = time.time() - start_wall
        frac = min(elapsed / budget, 1.0)
        # warmup then cosine decay over the time budget (early stopping may end it sooner)
        scale = min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale

        resolution = CLIP_RESOLUTION if clip else int(data_rng.choice(IMAGE_RESOLUTIONS))
        pixels, _, batch_scenes = scenes.sample_batch(data_rng, batch_size, resolution, clip=clip, frames=CLIP_FRAMES)
        x = augment(_to_torch(pixels, clip), aug_rng)
        if clip:
            x = _drop_frames(x, aug_rng)
        targets = J.clip_targets(batch_scenes) if clip else J.image_targets(batch_scenes)
        model.train()
        loss = J.judge_loss(model, model(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        samples += batch_size
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value

        now = time.time()
        if now - last_print >= 15:
            print(f"[{kind}] step {step} samples {samples} loss {loss_ema:.4f} lr {lr * scale:.2e} {(now - start_wall) / 60:.1f} min", flush=True)
            last_print = now
        out_of_time = now - start_wall >= budget
        if now - last_eval >= eval_every_s or out_of_time:
            last_eval = now
            result = evaluate(model, kind, sets, eval_rng)
            clean = min(r["adherence"] for name, r in result.items() if not name.endswith("+aug"))
            worst = min(v for name, r in result.items() if not name.endswith("+aug") for k, v in r.items() if k in attributes)
            aug = min(r["adherence"] for name, r in result.items() if name.endswith("+aug"))
            for name, r in result.items():
                print(f"[{kind}]   held-out {name}: {_fmt(r)}", flush=True)
            done = clean >= target and worst >= attr_target and aug >= aug_target and now - start_wall >= min_minutes * 60
            if done or out_of_time:
                reason = "target reached" if done else "time budget spent"
                print(f"[{kind}] stop ({reason}) at step {step}: held-out clean adherence {clean:.4f} (worst attribute {worst:.4f}), degraded {aug:.4f}", flush=True)
                break
    minutes = (time.time() - start_wall) / 60
    cpu_minutes = (time.process_time() - start_cpu) / 60
    summary = {
        "kind": kind,
        "seed": seed,
        "steps": step,
        "samples": samples,
        "batch_size": batch_size,
        "wall_minutes": round(minutes, 2),
        "cpu_minutes": round(cpu_minutes, 2),
        "params": n_params,
        "heldout_seed": HELDOUT_SEED,
        "heldout": {name: {k: round(v, 5) for k, v in r.items()} for name, r in (result or {}).items()},
    }
    model.eval()
    J.save_judge(model, out_path, extra={"training": summary})
    print(f"[{kind}] saved {out_path} ({minutes:.1f} min wall, {cpu_minutes:.1f} min CPU)", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["image", "video", "both"], default="both")
    parser.add_argument("--minutes", type=float, default=12.0, help="time budget per judge (wall clock)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the shipped weights folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    kinds = ["image", "video"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        out = args.out_dir / f"{kind}.safetensors" if args.out_dir else None
        train_judge(kind, out, seed=args.seed, max_minutes=args.minutes, batch_size=args.batch_size, threads=args.threads)


if __name__ == "__main__":
    main()
