"""Train the embedded reference models from a seed on a CPU.

    python scripts/train_reference.py image-vae --minutes 8
    python scripts/train_reference.py image-text --minutes 3  # text encoder: reads captions into attributes
    python scripts/train_reference.py image --minutes 90      # resumable: run again to continue
    python scripts/train_reference.py video-vae --minutes 10
    python scripts/train_reference.py video-text --minutes 3
    python scripts/train_reference.py video --minutes 90
    python scripts/train_reference.py judge --kind both

Every stage checkpoints to ``work/reference/<stage>/`` every few minutes (full state, resumable,
not committed) and exports the shipped weights to ``pipelines/reference/weights/`` (EMA weights,
float16, with ``training_state.json``). A run on a fresh clone resumes from the shipped weights, and
so does a run whose local checkpoint is older than the shipped weights (trained elsewhere since).

The denoiser stages (image, video) also train on a GPU: ``--device cuda`` (``auto``, the default,
picks CUDA when there is one). There the batch is larger (``--batch-size``, default 256 instead of
32), autocast is bfloat16 on the GPU, batches are drawn by ``--workers`` CPU processes, and the run
saves every 2 minutes (``--save-every``). ``--minutes`` bounds the whole run, the final save included.
The VAE stages (image-vae, video-vae) train on a GPU the same way, with 8x the CPU batch.
``scripts/device_train.sh`` runs these on the device machine.

A new latent space is trained beside the shipped models, not over them: ``--weights DIR`` reads and writes
``DIR/<kind>/`` instead (checkpoints in ``work/reference/<kind>@<DIR name>/``), e.g.

    python scripts/train_reference.py video-vae --fresh --temporal-scale 2 --weights scripts/weights/next
    python scripts/train_reference.py video --weights scripts/weights/next   # starts from the shipped denoiser
    python scripts/eval_reference.py video --path scripts/weights/next/video --out ... --grid ...

and replaces the shipped folder only once its denoiser beats the shipped model.
"""

from __future__ import annotations

import time

T0 = time.time()  # --minutes counts from here: imports, loading and the final save included

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "pipelines" / "reference" / "weights"
WORK = ROOT / "work" / "reference"

from diffaccel.pipelines.reference import build, scenes  # noqa: E402


# bfloat16 autocast halves a training step on CPUs with AVX512-BF16/AMX (measured: 2.1-2.6 s -> 1.3 s
# per image-denoiser step) but is emulated, and several times slower, on AVX2-only CPUs: use it only
# where the CPU has it. Master weights, optimizer and losses stay float32 either way.
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": _cpu_has_bf16()}

CPU_BATCH_SIZE = 32  # images per denoiser step (video: a third as many clips)
# On a GPU, 8x: these models are small enough that a step of 32 leaves an H100 mostly idle (launch-bound),
# while 256 still gives thousands of optimizer steps in a few minutes. The peak learning rate stays 3e-4:
# a larger batch only lowers the gradient noise, so the CPU schedule stays stable (no sqrt/linear scaling).
GPU_BATCH_SIZE = 256


def autocast_for(device: torch.device) -> dict:
    """bfloat16 autocast on CUDA; on CPU only where the CPU has bf16 instructions (AUTOCAST)."""
    if device.type == "cuda":
        return {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True}
    return AUTOCAST


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    return torch.device(name)


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU (dict types and ``_metadata`` kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """Rendered pixels, channels last in [0, 1] -> the models' input, channels first in [-1, 1], on pixels'
    device: images (n, H, W, 3) -> (n, 3, H, W), clips (n, F, H, W, 3) -> (n, 3, F, H, W)."""
    order = (0, 3, 1, 2) if pixels.dim() == 4 else (0, 4, 1, 2, 3)
    return pixels.permute(*order).contiguous() * 2.0 - 1.0


def read_state(folder: Path) -> dict:
    path = folder / "training_state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ VAEs


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
                  else build.video_components(seed, temporal_scale=temporal_scale or 4))
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


# ------------------------------------------------------------------------------------------ text encoders
#
# Trained jointly with the denoiser from scratch, the text encoders learned captions slowly: after
# 4.5k denoiser steps the image model ignored the background word entirely (same image for every
# background). So each encoder is first taught to read a caption into the scene's attributes (the
# judge's targets, from linear heads on its output) and then frozen while the denoiser trains, the way
# real pipelines use a pretrained, frozen text encoder.

TEXT_OBJECTIVE = "scene attributes (judge targets) from linear heads"


class TextProbe(torch.nn.Module):
    """Linear heads that read the judge's attribute targets from one text embedding per caption."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        from diffaccel.pipelines.reference import judge

        if kind == "image":
            slots = len(scenes.POSITIONS)
            self.shapes = {"background": (len(scenes.COLORS),), "slot_shape": (slots, len(judge.SLOT_SHAPES)),
                           "slot_color": (slots, len(scenes.COLORS)), "slot_size": (slots, len(scenes.SIZES))}
        else:
            self.shapes = {"background": (len(scenes.COLORS),), "shape": (len(scenes.SHAPES),),
                           "color": (len(scenes.COLORS),), "size": (len(scenes.SIZES),),
                           "direction": (len(scenes.DIRECTIONS),), "speed": (len(scenes.SPEEDS),)}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, math.prod(v)) for k, v in self.shapes.items()})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(pooled).view(-1, *self.shapes[k]) for k, head in self.heads.items()}


def text_features(kind: str, pipe, captions: list[str], rng: np.random.Generator) -> torch.Tensor:
    """The embeddings the pipeline feeds the denoiser, every position, flattened: (positions, dim).

    Each position is trained to carry the whole scene, so whichever text token a denoiser's attention
    finds, it reads every attribute. Image (CogView4: left padding, no attention mask, reads
    ``hidden_states[-2]``): all positions, pads included, after a random number of extra left pads so
    the encoding does not depend on how long the batch was padded. Video (Wan: a mask, the last
    hidden state, pads zeroed): the real tokens.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if kind == "image":
        ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
        extra = int(rng.integers(0, 33))
        ids = torch.cat([torch.full((ids.shape[0], extra), tokenizer.pad_token_id), ids], dim=1)
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        return hidden.flatten(0, 1)
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    hidden = encoder(batch.input_ids, batch.attention_mask).last_hidden_state
    return hidden[batch.attention_mask.bool()]


def positions_per_caption(kind: str, pipe, captions: list[str], features: torch.Tensor) -> torch.Tensor:
    """How many feature rows each caption contributed (to repeat its targets)."""
    if kind == "image":
        return torch.full((len(captions),), features.shape[0] // len(captions))
    return pipe.tokenizer(captions, padding="longest", return_tensors="pt").attention_mask.sum(1)


def train_text_encoder(kind: str, minutes: float, seed: int, batch_size: int = 256, weights: Path = WEIGHTS) -> None:
    from diffaccel.pipelines.reference import judge

    components = build.image_components(seed) if kind == "image" else build.video_components(seed)
    pipe = (build.image_pipeline if kind == "image" else build.video_pipeline)(components)
    out = weights / kind / "text_encoder"
    state = read_state(out)
    resumed = pretrained_text_encoder(kind, pipe.text_encoder, weights, fall_back=False)
    if resumed is not None:
        pipe.text_encoder = resumed
        log(f"resuming the {kind} text encoder after {state['steps']} steps (fresh probe and optimizer)")
    encoder = pipe.text_encoder.train()
    dim = encoder.config.d_model
    probe = TextProbe(kind, dim)
    targets_of = judge.image_targets if kind == "image" else judge.clip_targets
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=1e-3)
    rng = np.random.default_rng(seed + 500)
    steps, start = 0, time.time()

    def batch(n: int):
        picked = [scenes.sample_scene(rng, clip=kind == "video") for _ in range(n)]
        captions = [scenes.caption(s) for s in picked]
        features = text_features(kind, pipe, captions, rng)
        repeats = positions_per_caption(kind, pipe, captions, features)
        targets = {k: v.repeat_interleave(repeats, dim=0) for k, v in targets_of(picked).items()}
        return features, targets

    def accuracy() -> float:
        encoder.eval()
        with torch.no_grad():
            features, targets = batch(512)
            logits = probe(features)
            right = [(logits[k].argmax(-1) == t)[t != -100].float() for k, t in targets.items()]
        encoder.train()
        return float(torch.cat([r.flatten() for r in right]).mean())

    while time.time() - start < minutes * 60:
        features, targets = batch(batch_size)
        loss = judge.judge_loss(probe, probe(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 100 == 0:
            log(f"{kind} text step {steps} loss {loss.item():.4f}")
            if loss.item() < 1e-3 and accuracy() == 1.0:
                break
    encoder.eval()
    held_out = accuracy()
    encoder.to(torch.float16).save_pretrained(out)
    steps += state.get("steps", 0) if resumed is not None else 0
    minutes_spent = (time.time() - start) / 60 + (state.get("minutes", 0.0) if resumed is not None else 0.0)
    write_state(out, {"objective": TEXT_OBJECTIVE, "steps": steps, "seed": seed, "frozen_in_denoiser": True,
                      "attribute_accuracy": round(held_out, 4), "minutes": round(minutes_spent, 1)})
    log(f"{kind} text encoder saved: {steps} steps, attribute accuracy {held_out:.4f}")


def pretrained_text_encoder(kind: str, current, weights: Path = WEIGHTS, fall_back: bool = True):
    """The attribute-trained encoder of ``train_text_encoder`` (float32) in ``weights``, else (``fall_back``,
    a candidate folder without one of its own) the shipped one; None if not trained yet."""
    folder = weights / kind / "text_encoder"
    if fall_back and not folder.is_dir():
        folder = WEIGHTS / kind / "text_encoder"
    if read_state(folder).get("objective") != TEXT_OBJECTIVE:
        return None
    return type(current).from_pretrained(folder, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ denoisers


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels (SD3's training distribution)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def vae_folder(weights: Path, kind: str) -> Path:
    """The VAE a denoiser trains on: ``weights/<kind>/vae``, which a candidate folder must have first."""
    folder = weights / kind / "vae"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} holds no VAE: a denoiser trains on its folder's latent space, so train that "
                         f"first (python scripts/train_reference.py {kind}-vae --fresh --weights {weights})")
    return folder


class ImageRecipe:
    """CogView4: text encoder trained jointly; 64 px batches, every 4th batch 128 px."""

    kind = "image"
    train_text_encoder = True
    device = torch.device("cpu")  # where text embeddings go (``to``)

    def __init__(self, seed: int, weights: Path = WEIGHTS) -> None:
        from diffusers import AutoencoderKL

        self.weights = weights
        self.components = build.image_components(seed)
        self.components["vae"] = AutoencoderKL.from_pretrained(vae_folder(weights, "image"), torch_dtype=torch.float32)
        self.pipe = build.image_pipeline(self.components)

    def to(self, device: torch.device) -> "ImageRecipe":
        self.device = device
        return self

    @staticmethod
    def sample(rng, steps: int, batch_size: int):
        """Pixels (n, H, W, 3) in [0, 1] as numpy, and captions."""
        resolution = 128 if steps % 4 == 3 else 64
        n = batch_size if resolution == 64 else batch_size // 4
        pixels, captions, _ = scenes.sample_batch(rng, n, resolution)
        return pixels, captions

    to_model = staticmethod(pixels_to_model)

    def batch(self, rng, steps: int, batch_size: int):
        pixels, captions = self.sample(rng, steps, batch_size)
        return pixels_to_model(torch.from_numpy(pixels)), captions

    def latents(self, x, generator):
        # The posterior mean: the VAE's posterior std stayed near 1 (its tiny KL term never shrank it and
        # the decoder is trained on the mean), so a posterior *sample* is ~15% white noise in variance
        # that the denoiser would have to learn and the decoder turns into speckle.
        vae = self.pipe.vae
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def text(self, captions):
        with torch.set_grad_enabled(self.train_text_encoder):
            return self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=self.device)[0]

    def predict(self, transformer, xt, embeds, sigma):
        n, resolution = xt.shape[0], xt.shape[-1] * self.pipe.vae_scale_factor
        size = torch.tensor([[resolution, resolution]], dtype=torch.float32, device=xt.device).repeat(n, 1)
        return transformer(
            hidden_states=xt, encoder_hidden_states=embeds, timestep=sigma * 1000, original_size=size,
            target_size=size, crop_coords=torch.zeros(n, 2, device=xt.device), return_dict=False,
        )[0]


class VideoRecipe:
    """Wan: frozen text encoder (bidirectional UMT5), 9-frame 64 px clips."""

    kind = "video"
    train_text_encoder = False
    device = torch.device("cpu")  # where text embeddings and the latent statistics go (``to``)

    def __init__(self, seed: int, weights: Path = WEIGHTS) -> None:
        from diffusers import AutoencoderKLWan

        self.weights = weights
        self.components = build.video_components(seed)
        # The VAE as trained (its time compression included: the pipeline reads it from the VAE's config).
        self.components["vae"] = AutoencoderKLWan.from_pretrained(vae_folder(weights, "video"), torch_dtype=torch.float32)
        self.pipe = build.video_pipeline(self.components)
        config = self.pipe.vae.config
        self.mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)

    def to(self, device: torch.device) -> "VideoRecipe":
        self.device = device
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @staticmethod
    def sample(rng, steps: int, batch_size: int):
        """Clips (n, F, H, W, 3) in [0, 1] as numpy, and captions."""
        pixels, captions, _ = scenes.sample_batch(rng, batch_size // 3, 64, clip=True, frames=build.VIDEO_FRAMES)
        return pixels, captions

    to_model = staticmethod(pixels_to_model)

    def batch(self, rng, steps: int, batch_size: int):
        pixels, captions = self.sample(rng, steps, batch_size)
        return self.to_model(torch.from_numpy(pixels)), captions

    def latents(self, x, generator):
        return (self.pipe.vae.encode(x).latent_dist.mode() - self.mean) / self.std  # the mean, as for images

    def text(self, captions):
        # WanPipeline.__call__ pads prompts to 512 tokens (encode_prompt's own default is 226): train as it samples.
        with torch.no_grad():
            return self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=self.device,
                                           max_sequence_length=512)[0]

    def predict(self, transformer, xt, embeds, sigma):
        return transformer(hidden_states=xt, encoder_hidden_states=embeds, timestep=sigma * 1000, return_dict=False)[0]


def _loader_batch(kind: str, seed: int, batch_size: int, step: int):
    """One step's batch, drawn in a worker process from the stream (seed, step): pixels (numpy) and the
    captions, 10% of them dropped for CFG. Numpy only: nothing here touches torch or the GPU."""
    rng = np.random.default_rng([seed, 1000, step])
    pixels, captions = (ImageRecipe if kind == "image" else VideoRecipe).sample(rng, step, batch_size)
    return pixels, [c if rng.random() >= 0.1 else "" for c in captions]


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the training process, which ends the pool


class BatchLoader:
    """Draws the batches of the coming steps in ``workers`` forked processes, ``2 * workers`` steps ahead.

    ``draw(step)`` (picklable: a module-level function or a partial of one; ``_loader_batch`` for the
    denoisers, ``_vae_loader_batch`` for the VAEs) makes step k's batch from (seed, k) alone, so the data
    does not depend on the number of workers. The pool is forked before this process touches the GPU; the
    workers never use torch. A ``ProcessPoolExecutor``, not a ``multiprocessing.Pool``: a worker that dies
    (killed for memory, a crash in a native library) then fails the step with ``BrokenProcessPool`` instead
    of leaving the training loop waiting for ever on a task the dead worker took with it.
    """

    def __init__(self, draw, first_step: int, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.draw = draw
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_ignore_sigint)
        self.step = first_step
        self.pending: collections.deque = collections.deque()
        self.wait = 0.0  # seconds the training loop waited for data
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        self.pending.append((self.step, self.pool.submit(self.draw, self.step)))
        self.step += 1

    def get(self):
        from concurrent.futures.process import BrokenProcessPool

        t = time.time()
        step, future = self.pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool as error:
            raise RuntimeError(f"a data worker died while drawing step {step}'s batch (killed for memory? "
                               f"rerun with fewer --workers, or 0 to draw in this process)") from error
        self.wait += time.time() - t
        self._submit()
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class StepProfile:
    """Where a training step's time goes (``--profile``): seconds per phase, synchronising the device at each
    phase's end so that asynchronous CUDA work is charged to the phase that queued it."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.steps, self.last = 0, time.time()

    def start(self) -> None:
        self.last = time.time()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.time()
        self.totals[phase] += now - self.last
        self.last = now

    def report(self, steps: int) -> str:
        """Mean milliseconds per step in each phase since the last report, then reset."""
        if not self.enabled or not self.totals:
            return ""
        per_step = {k: 1000 * v / max(1, steps) for k, v in self.totals.items()}
        self.totals.clear()
        return "; ms/step " + ", ".join(f"{k} {v:.0f}" for k, v in per_step.items())


def train_denoiser(kind: str, minutes: float, seed: int, batch_size: int = CPU_BATCH_SIZE,
                   device: torch.device = torch.device("cpu"), workers: int = 0, lr_peak: float = 3e-4,
                   save_every: float = 5.0, deadline: float | None = None, profile: bool = False,
                   weights: Path = WEIGHTS) -> None:
    """Flow matching (v = noise - x0 at t = 1000 sigma) with 10% caption dropout for CFG, and an EMA.

    Stops in time to save before ``deadline`` (default: ``minutes`` from now). On the CPU with
    ``workers=0`` (the defaults) every step is what it always was; with workers the batches come from
    ``BatchLoader``'s streams instead. Off the CPU a fresh optimizer warms up again over 100 steps.
    """
    deadline = deadline if deadline is not None else time.time() + minutes * 60
    recipe = ImageRecipe(seed, weights) if kind == "image" else VideoRecipe(seed, weights)
    pipe = recipe.pipe
    pipe.vae.eval().requires_grad_(False)
    export, work = weights / kind, work_folder(weights, kind)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    shipped = read_state(export / "transformer")
    if not shipped and weights != WEIGHTS and read_state(WEIGHTS / kind / "transformer"):
        # A candidate (e.g. a new VAE in another folder) starts from the shipped denoiser's weights.
        export_from = WEIGHTS / kind
        log(f"{export} has no transformer yet: starting from the shipped one ({export_from / 'transformer'})")
    else:
        export_from = export
    shipped = read_state(export_from / "transformer")
    steps, trained_minutes, saved = 0, 0.0, None
    pretrained = pretrained_text_encoder(kind, pipe.text_encoder, weights)
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
        if shipped.get("steps", 0) > saved["steps"]:
            # Trained further elsewhere (e.g. on a GPU) and fetched: the local checkpoint is stale.
            log(f"ignoring {checkpoint} (step {saved['steps']}): the shipped weights are newer")
            saved = None
    if saved is not None:
        pipe.transformer.load_state_dict(saved["transformer"])
        if pretrained is None:
            pipe.text_encoder.load_state_dict(saved["text_encoder"])
        steps, trained_minutes = saved["steps"], saved["minutes"]
        log(f"resuming from {checkpoint} at step {steps}")
    elif shipped:
        pipe.transformer.load_state_dict(type(pipe.transformer).from_pretrained(export_from / "transformer").float().state_dict())
        if pretrained is None:
            pipe.text_encoder.load_state_dict(type(pipe.text_encoder).from_pretrained(export_from / "text_encoder").float().state_dict())
        steps, trained_minutes = shipped["steps"], shipped["minutes"]
        log(f"resuming from the shipped weights at step {steps} (fresh optimizer)")
    if pretrained is not None:
        pipe.text_encoder = recipe.components["text_encoder"] = pretrained
        recipe.train_text_encoder = False
        log(f"text encoder: attribute-trained, frozen ({pretrained.config._name_or_path})")
    # Fork the batch workers before this process initialises CUDA (and before the models move there).
    loader = BatchLoader(functools.partial(_loader_batch, kind, seed, batch_size), steps, workers) if workers > 0 else None
    try:
        transformer, text_encoder = pipe.transformer, pipe.text_encoder
        transformer.to(device)  # all no-ops on the CPU
        text_encoder.to(device)
        pipe.vae.to(device)
        recipe.to(device)
        ema = copy.deepcopy(transformer).requires_grad_(False).eval()
        if saved is not None:
            ema.load_state_dict(saved["ema"])
        params = list(transformer.parameters())
        if recipe.train_text_encoder:
            params += list(text_encoder.parameters())
            text_encoder.train()
        else:
            text_encoder.requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(params, lr=lr_peak, weight_decay=0.0)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        rewarm = 100 if saved is None and device.type != "cpu" else 0
        del saved
        transformer.train()
        autocast = autocast_for(device)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        log(f"{kind}: training on {device} ({where}), batch {batch_size}"
            f"{f' ({batch_size // 3} clips)' if kind == 'video' else ''}, {workers} data workers, peak lr {lr_peak:g}, "
            f"{(deadline - time.time()) / 60:.1f} min left")

        rng = np.random.default_rng(seed + 1000 + steps)
        generator = torch.Generator().manual_seed(seed + steps)
        start = last_save = time.time()
        losses: list[float] = []
        run_steps, step_seconds, save_seconds = 0, 0.0, 5.0  # save_seconds: a guess until a save is timed
        first_step, tick = steps, time.time()
        timer = StepProfile(device, profile)

        def save() -> None:
            nonlocal save_seconds
            began = time.time()
            elapsed = trained_minutes + (began - start) / 60
            state = {"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "steps": steps, "minutes": elapsed}
            torch.save(state if device.type == "cpu" else to_cpu(state), checkpoint)
            export_pipeline(recipe, ema, export)
            write_state(export / "transformer", {"steps": steps, "minutes": round(elapsed, 1), "seed": seed,
                                                 "loss_last_200": round(float(np.mean(losses[-200:] or [0])), 4)})
            save_seconds = time.time() - began
            log(f"checkpoint at step {steps} ({elapsed:.1f} min); loss {np.mean(losses[-200:] or [0]):.4f} "
                f"(saved in {save_seconds:.1f} s)")

        # Stop when one more step and the final save would not fit before the deadline.
        while time.time() + step_seconds + 1.5 * save_seconds < deadline:
            began = time.time()
            timer.start()
            if loader is not None:
                pixels, captions = loader.get()
                x = recipe.to_model(torch.from_numpy(pixels).to(device))
            else:
                x, captions = recipe.batch(rng, steps, batch_size)
                captions = [c if rng.random() >= 0.1 else "" for c in captions]
                x = x.to(device)
            timer.mark("data")
            with torch.no_grad():
                x0 = recipe.latents(x, generator)
            timer.mark("vae")
            sigma = sample_sigmas(x0.shape[0], generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            s = sigma.view(-1, *([1] * (x0.dim() - 1)))
            xt = (1 - s) * x0 + s * noise
            with torch.autocast(**autocast):
                embeds = recipe.text(captions)
                timer.mark("text")
                prediction = recipe.predict(transformer, xt, embeds, sigma)
            loss = F.mse_loss(prediction.float(), noise - x0)
            value = loss.item()
            timer.mark("forward")
            if not math.isfinite(value):
                raise SystemExit(f"{kind} step {steps}: loss is {value}; stopping without saving "
                                 f"(the last checkpoint and export are kept)")
            lr = lr_peak * min(1.0, (steps + 1) / 500)
            if rewarm:
                lr *= min(1.0, (run_steps + 1) / rewarm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            timer.mark("backward+step")
            decay = min(0.999, (1 + steps) / (10 + steps))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            timer.mark("ema")
            steps += 1
            run_steps += 1
            losses.append(value)
            if steps % 50 == 0:
                message = f"{kind} step {steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.1e}"
                if device.type != "cpu" or loader is not None:
                    now = time.time()
                    rate = (steps - first_step) / (now - tick)
                    waited = f", waiting for data {100 * loader.wait / (now - tick):.0f}%" if loader else ""
                    per_step = batch_size if kind == "image" else batch_size // 3
                    samples = f"{rate * per_step:.0f} {'images' if kind == 'image' else 'clips'}/s"
                    message += f" ({rate:.2f} steps/s, {samples}{waited})"
                    first_step, tick = steps, now
                    if loader:
                        loader.wait = 0.0
                log(message + timer.report(50))
            if time.time() - last_save > save_every * 60 and deadline - time.time() > 60 + 1.5 * save_seconds:
                save()
                last_save = time.time()
            step_seconds = time.time() - began
    finally:
        if loader is not None:
            loader.close()
    save()


def work_folder(weights: Path, kind: str) -> Path:
    """Where a denoiser's full checkpoint goes (not committed): work/reference/KIND for the shipped models,
    work/reference/KIND@FOLDER for a candidate in another ``--weights`` folder."""
    return WORK / kind if weights == WEIGHTS else WORK / f"{kind}@{weights.name}"


def export_pipeline(recipe, ema, export: Path) -> None:
    """The shipped folder: EMA transformer and text encoder in float16; VAE, tokenizer, scheduler as trained."""
    components = dict(recipe.components)
    components["transformer"] = copy.deepcopy(ema).to("cpu", torch.float16)
    components["text_encoder"] = copy.deepcopy(recipe.pipe.text_encoder).to("cpu", torch.float16)
    # The VAE folder is its own stage's output (its decoder may be sharpened meanwhile): save it as it is on disk.
    components["vae"] = type(recipe.pipe.vae).from_pretrained(recipe.weights / recipe.kind / "vae")
    pipeline = build.image_pipeline(components) if recipe.kind == "image" else build.video_pipeline(components)
    pipeline.save_pretrained(export)


def default_workers() -> int:
    """Batch workers on a GPU machine: every core but three (the training process, its threads, the OS)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 4
    return max(1, min(14, cores - 3))


# The stages that read each option; any other stage refuses it by name instead of ignoring it.
OPTION_STAGES = {
    "kind": ("judge",),
    "decoder_only": ("image-vae", "video-vae"),
    "fresh": ("image-vae", "video-vae"),
    "temporal_scale": ("video-vae",),
    "foreground_weight": ("image-vae", "video-vae"),
    "device": ("image-vae", "video-vae", "image", "video"),
    "batch_size": ("image-vae", "video-vae", "image", "video"),
    "workers": ("image-vae", "video-vae", "image", "video"),
    "lr": ("image-vae", "video-vae", "image", "video"),
    "profile": ("image", "video"),
    "save_every": ("image-vae", "video-vae", "image", "video"),
    "weights": ("image-vae", "video-vae", "image-text", "video-text", "image", "video"),
}


def refuse_unused_options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """An option the stage does not read is an error that names it, not a silent no-op."""
    for name, stages in OPTION_STAGES.items():
        if args.stage not in stages and getattr(args, name) != parser.get_default(name):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} does nothing for the {args.stage} stage; it is read by: {', '.join(stages)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["image-vae", "image-text", "image", "video-vae", "video-text", "video", "judge"])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="wall-clock budget of this run (image/video: from start-up to the end of the final save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kind", default="both", help="judge: image, video or both")
    parser.add_argument("--decoder-only", action="store_true", help="VAE stages: sharpen the decoder, keep the latent space")
    parser.add_argument("--fresh", action="store_true",
                        help="VAE stages: start from the seed, not the saved VAE (a new latent space: retrain the denoiser)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="image/video/VAE stages: where to train (auto: CUDA if available; other stages: CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"image/video: images per step, video a third as many clips "
                             f"(default {CPU_BATCH_SIZE} on CPU, {GPU_BATCH_SIZE} on CUDA); VAE stages: images "
                             f"(clips) per step (default 16 (4) on CPU, 8x that on CUDA)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image/video/VAE stages: processes drawing batches (default 0 on CPU: in the training "
                             "process; on CUDA all cores but three, at most 14)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (image/video: default 3e-4; VAE stages: 1e-3, decoder-only 3e-4; "
                             "a lower one polishes a trained VAE, whose PSNR swings by 2 dB between saves at 1e-3)")
    parser.add_argument("--profile", action="store_true",
                        help="image/video: add where each step's time goes (ms per phase) to the progress lines")
    parser.add_argument("--weights", type=Path, default=WEIGHTS,
                        help="the model folders this run reads and writes (default: the shipped ones, "
                             "pipelines/reference/weights); another folder trains a candidate beside them")
    parser.add_argument("--temporal-scale", type=int, choices=sorted(build.VIDEO_TEMPORAL_SCALES), default=None,
                        help="video-vae --fresh: the VAE's time compression (default 4, as the shipped VAE)")
    parser.add_argument("--foreground-weight", type=float, default=0.0,
                        help="VAE stages: weigh the shapes' pixels 1 + this in the reconstruction loss (default 0)")
    parser.add_argument("--save-every", type=float, default=None,
                        help="image/video: minutes between checkpoints (default 5 on CPU, 2 on CUDA); "
                             "VAE stages: between saves of the weights (default 10)")
    args = parser.parse_args(argv)
    denoiser = args.stage in ("image", "video")
    gpu_capable = denoiser or args.stage.endswith("-vae")
    refuse_unused_options(parser, args, argv)
    device = resolve_device(args.device) if gpu_capable else torch.device("cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.stage.endswith("-vae"):
        workers = args.workers if args.workers is not None else (default_workers() if device.type == "cuda" else 0)
        train_vae(args.stage.split("-")[0], args.minutes, args.seed, decoder_only=args.decoder_only,
                  save_every=args.save_every or 10.0, device=device, batch_size=args.batch_size, fresh=args.fresh,
                  workers=workers, weights=args.weights.resolve(), temporal_scale=args.temporal_scale,
                  foreground_weight=args.foreground_weight, lr=args.lr)
    elif args.stage.endswith("-text"):
        train_text_encoder(args.stage.split("-")[0], args.minutes, args.seed, weights=args.weights.resolve())
    elif denoiser:
        gpu = device.type == "cuda"
        if gpu:
            torch.backends.cudnn.benchmark = True  # fixed shapes; convolutions already use TF32 by default
        batch_size = args.batch_size or (GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE)
        if batch_size < 4:
            raise SystemExit("--batch-size must be at least 4 (image: a quarter of it at 128 px; video: a third, clips)")
        workers = args.workers if args.workers is not None else (default_workers() if gpu else 0)
        save_every = args.save_every if args.save_every is not None else (2.0 if gpu else 5.0)
        train_denoiser(args.stage, args.minutes, args.seed, batch_size=batch_size, device=device, workers=workers,
                       lr_peak=args.lr or 3e-4, save_every=save_every, deadline=T0 + args.minutes * 60,
                       profile=args.profile, weights=args.weights.resolve())
    elif args.stage == "judge":
        sys.path.insert(0, str(Path(__file__).parent))
        from train_judge import main as judge_main

        return judge_main(["--kind", args.kind, "--minutes", str(args.minutes), "--seed", str(args.seed)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
