"""Prompt adherence of the reference models, judged by the shipped judge.

    python scripts/eval_reference.py image --num 200            # default steps and guidance
    python scripts/eval_reference.py image --num 200 --guidance 1.0
    python scripts/eval_reference.py video --num 200 --ceiling  # what the VAE allows: judge ground truth and
                                                                  # its reconstructions, no denoiser

Fixed prompt set (``scenes.prompt_set``), seed i for prompt i. Writes a JSON result and a grid of
the first samples to ``docs/``.
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

from diffaccel.pipelines import reference  # noqa: E402
from diffaccel.pipelines.reference import judge as judges  # noqa: E402
from diffaccel.pipelines.reference import scenes  # noqa: E402


def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 8, **kwargs) -> np.ndarray:
    """Images (n, H, W, 3) or clips (n, F, H, W, 3) in [0, 1], one seed per prompt."""
    outputs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        result = pipe(chunk, generator=generators, output_type="np", **kwargs)
        outputs.append(np.asarray(result.frames if hasattr(result, "frames") else result.images))
    return np.concatenate(outputs)


def to_judge_input(samples: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(samples).float()
    return tensor.permute(0, 3, 1, 2) if tensor.dim() == 4 else tensor.permute(0, 1, 4, 2, 3)


def transformer_time_fraction(pipe, kwargs: dict, prompt: str, repeats: int = 3) -> float:
    """Share of a baseline call's wall time spent inside the denoiser (median of repeats)."""
    spent = []

    def pre(module, args, kw):
        spent.append(-time.perf_counter())

    def post(module, args, kw, out):
        spent[-1] += time.perf_counter()

    handles = [pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
               pipe.transformer.register_forward_hook(post, with_kwargs=True)]
    fractions = []
    try:
        for r in range(repeats):
            spent.clear()
            start = time.perf_counter()
            pipe(prompt, generator=torch.Generator("cpu").manual_seed(r), output_type="np", **kwargs)
            fractions.append(sum(spent) / (time.perf_counter() - start))
    finally:
        for h in handles:
            h.remove()
    return float(np.median(fractions))


def save_grid(samples: np.ndarray, path: Path, columns: int = 8) -> None:
    from PIL import Image

    if samples.ndim == 5:  # clips: first, middle and last frame side by side
        samples = np.concatenate([samples[:, 0], samples[:, samples.shape[1] // 2], samples[:, -1]], axis=2)
    rows = [np.concatenate(list(samples[r : r + columns]), axis=1) for r in range(0, len(samples), columns)]
    rows = [r for r in rows if r.shape[1] == rows[0].shape[1]]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def load(kind: str, folder: Path | None = None, vae_only: bool = False):
    """The shipped reference pipeline, or the one in ``folder`` (a candidate trained with
    ``train_reference.py --weights``) in float32 on the CPU; the prompts and the judge stay the kind's.
    ``vae_only``: the shipped pipeline with ``folder/vae`` in place of its VAE (a candidate VAE, before any
    denoiser is trained on it)."""
    if folder is None:
        return reference.load(kind)
    if vae_only:
        pipe = reference.load(kind)
        pipe.vae = type(pipe.vae).from_pretrained(folder / "vae", torch_dtype=torch.float32)
        return pipe
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(kind: str, num: int, guidance: float | None, steps: int | None, resolution: int | None,
             seed_offset: int = 0, folder: Path | None = None, frames: int | None = None) -> dict:
    pipe = load(kind, folder)
    judge = judges.load_judge(kind)
    kwargs = reference.call_defaults(kind)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if resolution is not None:
        kwargs["height"] = kwargs["width"] = resolution
    if frames is not None:
        kwargs["num_frames"] = frames
    prompts = scenes.prompt_set(num, clip=kind == "video")
    fraction = transformer_time_fraction(pipe, kwargs, prompts[0])
    seeds = [seed_offset + i for i in range(num)]
    start = time.perf_counter()
    samples = generate(pipe, prompts, seeds, **kwargs)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        scores = judges.adherence(judge, to_judge_input(samples), prompts)
        per_attribute = judges.attribute_accuracy(judge, to_judge_input(samples), prompts)
    return {
        "model": kind if folder is None else f"{kind} ({folder})",
        "num_prompts": num,
        "call": kwargs,
        "adherence": round(float(np.mean(scores)), 4),
        "per_attribute": {k: round(float(v), 4) for k, v in per_attribute.items()},
        "seconds": round(seconds, 1),
        "transformer_time_fraction": round(fraction, 3),
        "samples": samples,
    }


def ceiling(kind: str, num: int, folder: Path | None = None, resolution: int | None = None,
            frames: int | None = None) -> dict:
    """The adherence a perfect denoiser would reach through this VAE: the prompt set's ground-truth renders
    and their reconstructions (encoded to the posterior mean, the latents the denoiser trains on, and
    decoded), both judged. The gap between this and the model's adherence is the denoiser's; the gap below
    the ground truth is the VAE's."""
    pipe = load(kind, folder, vae_only=True)  # only the VAE takes part
    judge = judges.load_judge(kind)
    call = reference.call_defaults(kind)
    size = resolution or call.get("height", 64)
    frames = frames or call.get("num_frames", 9)
    chosen = scenes.prompt_scenes(num, clip=kind == "video")
    prompts = [scenes.caption(scene) for scene in chosen]
    if kind == "video":
        truth = np.stack([scenes.render_clip(scene, size, frames) for scene in chosen])
    else:
        truth = np.stack([scenes.render_image(scene, size) for scene in chosen])
    rebuilt = []
    with torch.no_grad():
        for i in range(0, num, 16):  # channels last (renders) <-> channels first (VAE), images and clips alike
            x = torch.movedim(torch.from_numpy(truth[i:i + 16]), -1, 1) * 2.0 - 1.0
            decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
            rebuilt.append(torch.movedim((decoded.clamp(-1.0, 1.0) + 1.0) / 2.0, 1, -1).numpy())
    rebuilt = np.concatenate(rebuilt)
    mse = ((rebuilt - truth) ** 2).reshape(num, -1).mean(axis=1)
    result = {"model": kind if folder is None else f"{kind} ({folder})", "num_prompts": num, "size": size,
              **({"frames": frames} if kind == "video" else {}),
              "vae_psnr_db": round(float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))), 2)}
    with torch.no_grad():
        for name, pixels in (("ground_truth", truth), ("vae_reconstruction", rebuilt)):
            per_attribute = judges.attribute_accuracy(judge, to_judge_input(pixels), prompts)
            result[name] = {k: round(float(v), 4) for k, v in per_attribute.items()}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=reference.NAMES)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None,
                        help="video: frames per clip (default the model's, 9; e.g. 17 at --resolution 128, the long "
                             "clips of train_reference.py --long-every); the judge resamples clips to 9 frames")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON result path (default docs/reference_<kind>_eval.json)")
    parser.add_argument("--grid", default=None, help="grid image path (default docs/reference_<kind>_grid.png)")
    parser.add_argument("--ceiling", action="store_true",
                        help="judge the prompts' ground truth and its VAE reconstructions instead of samples "
                             "(default --out docs/reference_<kind>_ceiling.json)")
    parser.add_argument("--path", type=Path, default=None,
                        help="evaluate the pipeline in this folder instead of the shipped one (a candidate from "
                             "train_reference.py --weights DIR: DIR/KIND; --ceiling reads only DIR/KIND/vae); "
                             "give --out and --grid with it")
    args = parser.parse_args(argv)
    if args.path is not None:
        needed = "vae/config.json" if args.ceiling else "model_index.json"
        if not (args.path / needed).is_file():
            parser.error(f"--path {args.path}: no {needed} there (a pipeline folder, e.g. scripts/weights/next/video"
                         f"{'; --ceiling reads only its VAE' if args.ceiling else ''})")
        if args.out is None or (args.grid is None and not args.ceiling):
            parser.error("--path needs --out (and --grid unless --ceiling): a candidate must not overwrite the "
                         "shipped model's figures in docs/")
    if args.frames is not None and (args.kind != "video" or args.frames < 2):
        parser.error("--frames is the clip length of the video model (at least 2)")
    if args.ceiling and (args.guidance is not None or args.steps is not None):
        parser.error("--ceiling runs no denoiser: --guidance and --steps do nothing there")
    torch.set_num_threads(args.threads)
    if args.ceiling:
        result = ceiling(args.kind, args.num, args.path, args.resolution, args.frames)
        out = Path(args.out or ROOT / "docs" / f"reference_{args.kind}_ceiling.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    result = evaluate(args.kind, args.num, args.guidance, args.steps, args.resolution, folder=args.path,
                      frames=args.frames)
    samples = result.pop("samples")
    suffix = "" if args.guidance is None else f"_g{args.guidance:g}"
    grid = Path(args.grid or ROOT / "docs" / f"reference_{args.kind}_grid{suffix}.png")
    save_grid(samples[:32], grid)
    out = Path(args.out or ROOT / "docs" / f"reference_{args.kind}_eval{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
