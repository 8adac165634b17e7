"""Reproduce the shipped students of the reference models, resumably, on a CPU.

    python scripts/train_distill.py image-lcd --max-steps 1027     # ~45 min, one thread
    python scripts/train_distill.py image-rglcd --max-steps 1027   # RG-LCD (judge via latent proxy, β 0.25), ~47 min
    python scripts/train_distill.py image-tdm                      # TDM (data-free), its default learning rates, 45 min
    python scripts/train_distill.py image-tdm-ms                   # image-tdm taught 128 px too (turbo's), 45 min
    python scripts/train_distill.py image-tdm-lr5e-4 --no-ship     # TDM at lr 5e-4 / 1e-3: best at 2 steps, less diverse
    python scripts/train_distill.py image-lcd-w --no-ship --max-steps 1027   # LCD + guidance-scale embedding (CFG 1..8)
    python scripts/train_distill.py video-tdm --no-ship                  # TDM of the video model on its clips
    python scripts/train_distill.py video-tdm-sparse --no-ship --max-steps 220   # the same, sparsity-aware
    python scripts/train_distill.py image-lcd --resume   # after a kill: continue from the last checkpoint
    python scripts/train_distill.py image-rglcd --reward-scale 0.5 --max-steps 1027 --no-ship   # a β sweep point

Trains in work/distill/<name> (a checkpoint every 3 minutes) with the settings below, then copies the
student (student.json + LoRA weights, float16) into pipelines/reference/weights/<name>/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The shipped students: the teacher and the LCDConfig fields of each.
RECIPES = {
    "image-lcd": {"teacher": "reference:image", "method": "lcd",
                  "config": {"student_steps": 4, "lora_rank": 16, "learning_rate": 5e-4}},
    # β 0.25 of a sweep (0.25 / 0.5 / 1, docs/distill_bench/report.md); 2 steps, where it is best. LCD training
    # does not read student_steps (only the card does): the same weights as with 4.
    "image-rglcd": {"teacher": "reference:image", "method": "rg-lcd", "reward": {"reward_scale": 0.25},
                    "config": {"student_steps": 2, "lora_rank": 16, "learning_rate": 5e-4}},
    "image-tdm": {"teacher": "reference:image", "method": "tdm", "config": {"student_steps": 4, "lora_rank": 16}},
    # The turbo preset's student: image-tdm taught the teacher's other training size, iterations alternating
    # between 64 and 128 px (45 min on top of image-tdm's 45).
    "image-tdm-ms": {"teacher": "reference:image", "method": "tdm",
                     "config": {"student_steps": 4, "lora_rank": 16, "sizes": (64, 128), "init_student": "image-tdm"}},
    # LCD with LCM's guidance-scale embedding: one student for CFG scales 1..8 (not shipped: the weights budget).
    "image-lcd-w": {"teacher": "reference:image", "method": "lcd",
                    "config": {"student_steps": 4, "lora_rank": 16, "learning_rate": 5e-4, "guidance_range": (1.0, 8.0)}},
    # TDM of the reference video model on its clips (9 frames, 64 px); not shipped: it waits for a video model
    # trained at a long sequence, where the student would also train with block-sparse attention (issue 8).
    "video-tdm": {"teacher": "reference:video", "method": "tdm", "config": {"student_steps": 4, "lora_rank": 16}},
    # the same, sparsity-aware (Video-BLADE): the student attends block-sparsely (16-token blocks: the clips are 192
    # tokens), the teacher and fake score densely; a check of the mechanism, not of speed at this length
    "video-tdm-sparse": {"teacher": "reference:video", "method": "tdm",
                         "config": {"student_steps": 4, "lora_rank": 16,
                                    "sparse_attention": {"block_size": 16, "dense_blocks": []}}},
    "image-tdm-lr5e-4": {"teacher": "reference:image", "method": "tdm",
                  "config": {"student_steps": 4, "lora_rank": 16, "learning_rate": 5e-4, "fake_learning_rate": 1e-3}},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of this run")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps (equal-budget comparisons; the shipped LCD took 1027)")
    parser.add_argument("--reward-scale", type=float, default=None,
                        help="RG-LCD: β of −β·R instead of the recipe's (trains in work/distill/<name>-b<β>)")
    parser.add_argument("--work", default=None, help="training folder (default work/distill/<name>)")
    parser.add_argument("--no-ship", action="store_true", help="leave pipelines/reference/weights untouched")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffaccel.distill import LCDConfig, RewardConfig, TDMConfig, distill
    from diffaccel.pipelines.reference import WEIGHTS

    recipe = RECIPES[args.name]
    if args.reward_scale is not None and "reward" not in recipe:
        parser.error(f"--reward-scale is RG-LCD's β; recipe {args.name} has no reward term.")
    reward_fields = {**recipe.get("reward", {}),
                     **({"reward_scale": args.reward_scale} if args.reward_scale is not None else {})}
    suffix = f"-b{args.reward_scale:g}" if args.reward_scale is not None else ""
    work = Path(args.work or ROOT / "work" / "distill" / f"{args.name}{suffix}")
    reward = RewardConfig(**reward_fields) if "reward" in recipe else None
    config = (TDMConfig if recipe["method"] == "tdm" else LCDConfig)(**recipe["config"])
    distill(recipe["teacher"], work, config, method=recipe["method"], reward=reward,
            max_minutes=args.minutes, max_steps=args.max_steps, resume=args.resume)
    if not args.no_ship:
        target = WEIGHTS / args.name
        target.mkdir(parents=True, exist_ok=True)
        for file in ("student.json", "pytorch_lora_weights.safetensors", "guidance_embedding.safetensors"):
            if (work / file).is_file():
                shutil.copy2(work / file, target / file)
        print(f"shipped {args.name} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
