"""The denoiser stages (image, video): flow matching on the VAE's latents with a frozen, attribute-trained text
encoder, an EMA, resumable checkpoints, and the export of the shipped pipeline folder."""

from __future__ import annotations

import collections
import copy
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffaccel.pipelines.reference import build, scenes

from .common import (CPU_BATCH_SIZE, WEIGHTS, autocast_for, log, pixels_to_model, read_state, to_cpu, vae_folder,
                     work_folder, write_state)
from .loader import BatchLoader
from .text import pretrained_text_encoder


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels (SD3's training distribution)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


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


# --long-every: the long clips' size and frames (2,304 tokens a clip on the 2x-in-time VAE's latents, 1,280 on the
# 4x one's), where attention dominates a step and block-sparse attention pays (issue 8's bench length).
LONG_CLIPS = (128, 17)


def is_long_step(step: int, long_every: int) -> bool:
    return bool(long_every) and step % long_every == long_every - 1


class VideoRecipe:
    """Wan: frozen text encoder (bidirectional UMT5), 9-frame 64 px clips; with ``long_every`` every
    long_every-th step draws long clips (``LONG_CLIPS``) instead."""

    kind = "video"
    train_text_encoder = False
    device = torch.device("cpu")  # where text embeddings and the latent statistics go (``to``)

    def __init__(self, seed: int, weights: Path = WEIGHTS, long_every: int = 0) -> None:
        from diffusers import AutoencoderKLWan

        self.weights, self.long_every = weights, long_every
        self.components = build.video_components(seed)
        # The VAE as trained (its time compression included: the pipeline reads it from the VAE's config).
        self.components["vae"] = AutoencoderKLWan.from_pretrained(vae_folder(weights, "video"), torch_dtype=torch.float32)
        self.pipe = build.video_pipeline(self.components)
        config = self.pipe.vae.config
        self.mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        self.text_rows: dict[str, torch.Tensor] = {}  # caption -> its real tokens' rows (``text``)

    def to(self, device: torch.device) -> "VideoRecipe":
        self.device = device
        self.text_rows = {caption: rows.to(device) for caption, rows in self.text_rows.items()}
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @staticmethod
    def sample(rng, steps: int, batch_size: int, long_every: int = 0):
        """Clips (n, F, H, W, 3) in [0, 1] as numpy, and captions: a third of ``batch_size`` 9-frame 64 px
        clips, or on every ``long_every``-th step a 24th of it (at least one) of ``LONG_CLIPS``, which keeps
        the tokens of a step about the same (7.2x a clip on the 2x-in-time VAE's latents)."""
        if is_long_step(steps, long_every):
            (resolution, frames), n = LONG_CLIPS, max(1, batch_size // 24)
        else:
            resolution, frames, n = 64, build.VIDEO_FRAMES, batch_size // 3
        pixels, captions, _ = scenes.sample_batch(rng, n, resolution, clip=True, frames=frames)
        return pixels, captions

    to_model = staticmethod(pixels_to_model)

    def batch(self, rng, steps: int, batch_size: int):
        pixels, captions = self.sample(rng, steps, batch_size, self.long_every)
        return self.to_model(torch.from_numpy(pixels)), captions

    def latents(self, x, generator):
        return (self.pipe.vae.encode(x).latent_dist.mode() - self.mean) / self.std  # the mean, as for images

    def text(self, captions):
        """The prompts as ``WanPipeline.__call__`` encodes them: padded to 512 tokens (``encode_prompt``'s own
        default is 226), the pads' rows zeroed. The encoder is frozen and a caption's rows depend on it alone,
        so each distinct caption is encoded once, by itself (so the cache does not depend on which batch met it
        first): the clips' captions are 2,688 combinations. Encoding a 10-clip CPU batch took 357 ms (warm, two
        threads) of a ~2.3 s step; a cached batch takes 0.1 ms."""
        if self.pipe.text_encoder.training:
            raise RuntimeError("the video text encoder is frozen while the denoiser trains: put it in eval mode")
        for caption in dict.fromkeys(captions):
            if caption not in self.text_rows:
                with torch.no_grad():
                    embeds = self.pipe.encode_prompt([caption], do_classifier_free_guidance=False, device=self.device,
                                                     max_sequence_length=512)[0]
                real = torch.nonzero(embeds[0].abs().amax(dim=-1)).flatten()  # the pads' rows are exact zeros
                self.text_rows[caption] = embeds[0, : int(real.max()) + 1 if len(real) else 0]
        first = self.text_rows[captions[0]]
        out = first.new_zeros(len(captions), 512, first.shape[-1])
        for i, caption in enumerate(captions):
            rows = self.text_rows[caption]
            out[i, : rows.shape[0]] = rows
        return out

    def predict(self, transformer, xt, embeds, sigma):
        return transformer(hidden_states=xt, encoder_hidden_states=embeds, timestep=sigma * 1000, return_dict=False)[0]


def _loader_batch(kind: str, seed: int, batch_size: int, step: int, long_every: int = 0):
    """One step's batch, drawn in a worker process from the stream (seed, step): pixels (numpy) and the
    captions, 10% of them dropped for CFG. Numpy only: nothing here touches torch or the GPU."""
    rng = np.random.default_rng([seed, 1000, step])
    pixels, captions = (ImageRecipe.sample(rng, step, batch_size) if kind == "image"
                        else VideoRecipe.sample(rng, step, batch_size, long_every))
    return pixels, [c if rng.random() >= 0.1 else "" for c in captions]


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
                   weights: Path = WEIGHTS, long_every: int = 0) -> None:
    """Flow matching (v = noise - x0 at t = 1000 sigma) with 10% caption dropout for CFG, and an EMA.
    ``long_every`` (video): every long_every-th step trains on long clips (``VideoRecipe.sample``).

    Stops in time to save before ``deadline`` (default: ``minutes`` from now). On the CPU with
    ``workers=0`` (the defaults) every step is what it always was; with workers the batches come from
    ``BatchLoader``'s streams instead. Off the CPU a fresh optimizer warms up again over 100 steps.
    """
    deadline = deadline if deadline is not None else time.time() + minutes * 60
    if long_every < 0 or (long_every and kind != "video"):
        raise SystemExit(f"--long-every {long_every}: long clips are a video option (a step count >= 1; 0: none)")
    recipe = ImageRecipe(seed, weights) if kind == "image" else VideoRecipe(seed, weights, long_every)
    pipe = recipe.pipe
    pipe.vae.eval().requires_grad_(False)
    export, work = weights / kind, work_folder(weights, kind)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    if not (export / "transformer").is_dir() and weights != WEIGHTS and (WEIGHTS / kind / "transformer").is_dir():
        # A candidate (e.g. a new VAE in another folder) starts from the shipped denoiser's weights.
        export_from = WEIGHTS / kind
        log(f"{export} has no transformer yet: starting from the shipped one ({export_from / 'transformer'})")
    else:
        export_from = export
    shipped = read_state(export_from / "transformer")
    steps, trained_minutes, long_steps, saved = 0, 0.0, 0, None
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
        steps, trained_minutes, long_steps = saved["steps"], saved["minutes"], saved.get("long_steps", 0)
        log(f"resuming from {checkpoint} at step {steps}")
    elif shipped:
        pipe.transformer.load_state_dict(type(pipe.transformer).from_pretrained(export_from / "transformer").float().state_dict())
        if pretrained is None:
            pipe.text_encoder.load_state_dict(type(pipe.text_encoder).from_pretrained(export_from / "text_encoder").float().state_dict())
        steps, trained_minutes, long_steps = shipped["steps"], shipped["minutes"], shipped.get("long_steps", 0)
        log(f"resuming from the shipped weights at step {steps} (fresh optimizer)")
    if pretrained is not None:
        pipe.text_encoder = recipe.components["text_encoder"] = pretrained
        recipe.train_text_encoder = False
        log(f"text encoder: attribute-trained, frozen ({pretrained.config._name_or_path})")
    # Fork the batch workers before this process initialises CUDA (and before the models move there).
    loader = (BatchLoader(functools.partial(_loader_batch, kind, seed, batch_size, long_every=long_every), steps, workers)
              if workers > 0 else None)
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
                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "steps": steps, "minutes": elapsed,
                     "long_steps": long_steps}
            torch.save(state if device.type == "cpu" else to_cpu(state), checkpoint)
            export_pipeline(recipe, ema, export)
            record = {"steps": steps, "minutes": round(elapsed, 1), "seed": seed,
                      "loss_last_200": round(float(np.mean(losses[-200:] or [0])), 4)}
            if long_steps:
                record.update(long_steps=long_steps, long_clips=f"{LONG_CLIPS[0]} px x {LONG_CLIPS[1]} frames")
            write_state(export / "transformer", record)
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
            long_steps += is_long_step(steps, long_every)
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


def export_pipeline(recipe, ema, export: Path) -> None:
    """The shipped folder: EMA transformer and text encoder in float16; VAE, tokenizer, scheduler as trained."""
    components = dict(recipe.components)
    components["transformer"] = copy.deepcopy(ema).to("cpu", torch.float16)
    components["text_encoder"] = copy.deepcopy(recipe.pipe.text_encoder).to("cpu", torch.float16)
    # The VAE folder is its own stage's output (its decoder may be sharpened meanwhile): save it as it is on disk.
    components["vae"] = type(recipe.pipe.vae).from_pretrained(recipe.weights / recipe.kind / "vae")
    pipeline = build.image_pipeline(components) if recipe.kind == "image" else build.video_pipeline(components)
    pipeline.save_pretrained(export)
