"""The VAE stages (image-vae, video-vae): reconstruction training, then the latent normalisation the pipeline
uses."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffaccel.pipelines.reference import build, scenes

from .common import WEIGHTS, autocast_for, log, pixels_to_model, read_state, write_state
from .loader import BatchLoader


def vae_pixels(kind: str, rng: np.random.Generator, steps: int, batch_size: int) -> np.ndarray:
    """Images (n, H, W, 3) at 64 px (every 8th batch 128 px, a quarter as many), or clips (n, F, H, W, 3),
    in [0, 1]. Numpy only, so that ``_vae_loader_batch`` can draw it in a worker."""
    if kind == "image":
        resolution = 128 if steps % 8 == 7 else 64  # convolutional: mostly 64 px is enough
        return scenes.sample_batch(rng, batch_size if resolution == 64 else batch_size // 4, resolution)[0]
    return scenes.sample_batch(rng, batch_size, 64, clip=True, frames=build.VIDEO_FRAMES)[0]


def vae_batch(kind: str, rng: np.random.Generator, steps: int, batch_size: int) -> torch.Tensor:
    """One VAE batch drawn in this process (the CPU path, and the fixed evaluation batch)."""
    return pixels_to_model(torch.from_numpy(vae_pixels(kind, rng, steps, batch_size)))


def _vae_loader_batch(kind: str, seed: int, batch_size: int, step: int) -> np.ndarray:
    """Step ``step``'s VAE batch, drawn in a ``BatchLoader`` worker from the stream (seed, step)."""
    return vae_pixels(kind, np.random.default_rng([seed, 100, step]), step, batch_size)


def latent_spread(kind: str, z: torch.Tensor) -> torch.Tensor:
    """The latents' spread as the denoiser sees it, which scales the decoder's training noise (5% of it):
    one number for the image VAE (one scaling factor), one per channel for the video VAE (per-channel mean
    and std, which differ 18-fold). A global scale would drown the small channels in noise."""
    z = z.detach()
    return z.std() if kind == "image" else z.std(dim=(0, *range(2, z.dim())), keepdim=True)


VAE_WARMUP_STEPS = 100  # of every run's fresh optimizer


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights 1 + ``weight`` on the shapes: pixels whose colour differs (by more than 0.2 in
    [-1, 1]) from their sample's median colour, which is the flat background. A small shape is 1-2% of a
    clip's pixels, so the plain per-pixel loss first learns the background and lets the shapes fade (a
    fresh 2x-in-time video VAE after 1,263 CPU steps: 17.9 dB, shapes gone from the later frames)."""
    flat = x.detach().movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    background = flat.median(dim=1).values.view(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    shapes = ((x.detach() - background).abs().amax(dim=1, keepdim=True) > 0.2).to(x.dtype)
    return 1.0 + weight * shapes


def vae_autocast(device: torch.device) -> dict:
    """bfloat16 autocast for the VAEs on CUDA only. On a CPU with AMX/AVX512-BF16, bfloat16 autocast gave
    non-finite gradients in the video VAE's 3-D convolutions at its very first step (measured on a fresh VAE
    and on the shipped layout alike; float32 gives finite ones), so a CPU trains them in float32."""
    return autocast_for(device) if device.type == "cuda" else {"device_type": "cpu", "enabled": False}


def train_vae(kind: str, minutes: float, seed: int, decoder_only: bool = False, save_every: float = 10.0,
              device: torch.device = torch.device("cpu"), batch_size: int | None = None, fresh: bool = False,
              workers: int = 0, weights: Path = WEIGHTS, temporal_scale: int | None = None,
              foreground_weight: float = 0.0, lr: float | None = None) -> None:
    """Reconstruction (L1 + MSE) with a small KL term; then the latent normalisation the pipeline uses.
    Saves every ``save_every`` minutes and at the end. On CUDA the batch is 8x the CPU's (``batch_size``
    overrides it) and autocast is bfloat16, as for the denoisers. With ``workers`` the batches are drawn
    by a ``BatchLoader`` (on a GPU, drawing clips in this process took most of each step).

    ``decoder_only`` sharpens the decoder while the encoder, and so the latent space the denoiser is
    trained on, stays fixed. ``fresh`` starts from the seed's initialisation instead of the saved VAE: a new
    latent space, so the denoiser must be retrained on it; ``temporal_scale`` (video, fresh only) picks its
    time compression (``build.VIDEO_TEMPORAL_SCALES``). The VAE lives in ``weights/kind/vae``.
    ``foreground_weight`` weighs the shapes' pixels 1 + that in the reconstruction loss (``foreground_weights``).
    """
    out = weights / kind / "vae"
    batch_size = batch_size or (16 if kind == "image" else 4) * (8 if device.type == "cuda" else 1)
    if fresh and decoder_only:
        raise SystemExit("--fresh and --decoder-only contradict each other: a decoder-only run keeps the saved encoder")
    if temporal_scale is not None and (kind != "video" or not fresh):
        raise SystemExit("--temporal-scale sets the architecture of a fresh video VAE (video-vae --fresh); "
                         "a saved VAE keeps its own")
    components = (build.image_components(seed) if kind == "image"
                  else build.video_components(seed, temporal_scale=temporal_scale or 2))
    vae = components["vae"]
    state = {} if fresh else read_state(out)
    if state:
        vae = type(vae).from_pretrained(out, torch_dtype=torch.float32)
        log(f"resuming the {kind} VAE from step {state['steps']}")
    elif fresh:
        log(f"a fresh {kind} VAE from seed {seed}: the {kind} denoiser must be retrained on its latents")
    rng = np.random.default_rng(seed + 100 + state.get("steps", 0))
    steps, start = state.get("steps", 0), time.time()
    # Fork the batch workers before this process initialises CUDA.
    loader = (BatchLoader(functools.partial(_vae_loader_batch, kind, seed, batch_size), steps, workers)
              if workers > 0 else None)
    vae.to(device).train()
    log(f"{kind} vae: training on {device}, batch {batch_size}, {workers} data workers")
    trainable = vae.parameters()
    if decoder_only:
        if not state:
            raise SystemExit(f"--decoder-only needs a trained {kind} VAE to start from")
        vae.encoder.requires_grad_(False)
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv.requires_grad_(False)
        trainable = [p for p in vae.parameters() if p.requires_grad]
    base_lr = lr or (1e-3 if not decoder_only else 3e-4)
    optimizer = torch.optim.AdamW(trainable, lr=base_lr, weight_decay=0.0)
    first_steps, last_save, tick, tick_steps = steps, start, start, steps

    def save() -> None:
        vae.eval()
        with torch.no_grad():
            # The same 8 x 16 images (8 x 4 clips) whatever the training batch, so records compare.
            x = torch.cat([vae_batch(kind, np.random.default_rng(seed + 999 + i), 0, 16 if kind == "image" else 4)
                           for i in range(8)]).to(device)
            latents = vae.encode(x).latent_dist.mean
            recon = vae.decode(latents).sample
            psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, x)))
        vae.train()
        record = {"steps": steps, "seed": seed, "psnr_64px": round(psnr, 2)}
        # Steps trained at each foreground weight (a VAE saved before the option had none: weight 0).
        weighted = dict(state.get("foreground_weight_steps", {"0": state.get("steps", 0)} if state else {}))
        key = f"{foreground_weight:g}"
        weighted[key] = weighted.get(key, 0) + steps - first_steps
        if any(k != "0" for k in weighted):
            record["foreground_weight_steps"] = weighted
        if kind == "video":
            record["decoder_noise"] = "5% of each channel's std"
        if decoder_only:
            for key in ("scaling_factor", "latent_mean", "latents_mean", "latents_std"):
                if key in state:
                    record[key] = state[key]
            record["decoder_only_steps"] = state.get("decoder_only_steps", 0) + steps - first_steps
        elif kind == "image":
            record["scaling_factor"] = float(1.0 / latents.std())
            record["latent_mean"] = round(float(latents.mean()), 4)
            vae.register_to_config(scaling_factor=record["scaling_factor"])
        else:
            dims = (0, 2, 3, 4)
            record["latents_mean"] = [round(float(v), 5) for v in latents.mean(dim=dims)]
            record["latents_std"] = [round(float(v), 5) for v in latents.std(dim=dims)]
            vae.register_to_config(latents_mean=record["latents_mean"], latents_std=record["latents_std"])
        vae.to("cpu").save_pretrained(out)
        vae.to(device)
        record["minutes"] = round(state.get("minutes", 0.0) + (time.time() - start) / 60, 1)
        write_state(out, record)
        log(f"{kind} vae saved: {steps} steps, {record['minutes']} min, PSNR {psnr:.2f} dB")

    try:
        while time.time() - start < minutes * 60:
            if loader is not None:
                x = pixels_to_model(torch.from_numpy(loader.get()).to(device))
            else:
                x = vae_batch(kind, rng, steps, batch_size).to(device)
            with torch.autocast(**vae_autocast(device)):
                with torch.set_grad_enabled(not decoder_only):
                    posterior = vae.encode(x).latent_dist
                # Decode the posterior mean (what the denoiser is trained on) plus a little noise so the decoder
                # tolerates imperfect latents; the KL term only keeps the latent scale in check.
                z = posterior.mode()
                recon = vae.decode(z + 0.05 * latent_spread(kind, z) * torch.randn_like(z)).sample.float()
            kl = posterior.kl().mean() / x[0].numel()
            if foreground_weight:
                w = foreground_weights(x, foreground_weight)
                loss = (w * (recon - x).abs()).mean() + (w * (recon - x) ** 2).mean() + 1e-3 * kl
            else:
                loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-3 * kl
            if not math.isfinite(loss.item()):
                raise SystemExit(f"{kind} vae step {steps}: loss is {loss.item()}; stopping without saving "
                                 f"(the last save in {out} is kept)")
            # Every run starts a fresh optimizer: warm it up, or its first full-size steps undo a trained VAE
            # (a resumed image VAE fell from about 27 to 16.4 dB in 7 steps without this).
            for group in optimizer.param_groups:
                group["lr"] = base_lr * min(1.0, (steps - first_steps + 1) / VAE_WARMUP_STEPS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % 50 == 0:
                message = f"{kind} vae step {steps} loss {loss.item():.4f} (kl {kl.item():.2f})"
                if device.type != "cpu" or loader is not None:
                    now = time.time()
                    message += f" ({(steps - tick_steps) / (now - tick):.2f} steps/s"
                    if loader is not None:
                        message += f", waiting for data {100 * loader.wait / (now - tick):.0f}%"
                        loader.wait = 0.0
                    message += ")"
                    tick, tick_steps = now, steps
                log(message)
            if time.time() - last_save > save_every * 60:
                save()
                last_save = time.time()
    finally:
        if loader is not None:
            loader.close()
    save()
