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

The stages live in ``scripts/reference_training/`` (``vae``, ``text``, ``denoiser``; ``common`` and ``loader``
shared); this file is their command line.

The denoiser stages (image, video) also train on a GPU: ``--device cuda`` (``auto``, the default,
picks CUDA when there is one). There the batch is larger (``--batch-size``, default 256 instead of
32), autocast is bfloat16 on the GPU, batches are drawn by ``--workers`` CPU processes, and the run
saves every 2 minutes (``--save-every``). ``--minutes`` bounds the whole run, the final save included.
The VAE stages (image-vae, video-vae) train on a GPU the same way, with 8x the CPU batch.
``scripts/device_train.sh`` runs these on the device machine.

A new latent space is trained beside the shipped models, not over them: ``--weights DIR`` reads and writes
``DIR/<kind>/`` instead (checkpoints in ``work/reference/<kind>@<DIR name>/``), e.g.

    python scripts/train_reference.py video-vae --fresh --weights scripts/weights/next
    python scripts/train_reference.py video --weights scripts/weights/next   # starts from the shipped denoiser
    python scripts/eval_reference.py video --path scripts/weights/next/video --out ... --grid ...

and replaces the shipped folder only once its denoiser beats the shipped model.
"""

from __future__ import annotations

import time

T0 = time.time()  # --minutes counts from here: imports, loading and the final save included

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stages: scripts/reference_training/

from diffaccel.pipelines.reference import build  # noqa: E402
from reference_training.common import CPU_BATCH_SIZE, GPU_BATCH_SIZE, WEIGHTS, resolve_device  # noqa: E402
from reference_training.denoiser import train_denoiser  # noqa: E402
from reference_training.loader import default_workers  # noqa: E402
from reference_training.text import train_text_encoder  # noqa: E402
from reference_training.vae import train_vae  # noqa: E402


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
    "long_every": ("video",),
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
                        help="video-vae --fresh: the VAE's time compression (default 2, as the shipped VAE)")
    parser.add_argument("--foreground-weight", type=float, default=0.0,
                        help="VAE stages: weigh the shapes' pixels 1 + this in the reconstruction loss (default 0)")
    parser.add_argument("--long-every", type=int, default=0, metavar="N",
                        help="video: every N-th step trains on 128 px x 17-frame clips, a 24th of the batch (about "
                             "the same tokens), so that the model works at a long sequence (default 0: never)")
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
                       profile=args.profile, weights=args.weights.resolve(), long_every=args.long_every)
    elif args.stage == "judge":
        from train_judge import main as judge_main

        return judge_main(["--kind", args.kind, "--minutes", str(args.minutes), "--seed", str(args.seed)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
