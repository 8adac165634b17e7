"""Run under ``torchrun --nproc_per_node=2`` by test_distill_parallel.py: every method data parallel on the
reference image model. Each rank writes the captions of its first batch and a digest of its LoRA weights
after two LCD steps (``OUT/rank<i>.json``), then all ranks run ``distill()`` on a time budget into
``OUT/student``; then two TDM and two RG-LCD steps (digests of every trained part in ``OUT/others<i>.json``)
and a one-step TDM ``distill()`` into ``OUT/tdm-student``."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator  # noqa: E402

from diffaccel.distill import LCDConfig, RewardConfig, TDMConfig, distill  # noqa: E402
from diffaccel.distill.lcd import LCDTrainer, stream_index  # noqa: E402
from diffaccel.distill.rglcd import RGLCDTrainer  # noqa: E402
from diffaccel.distill.tdm import FAKE, STUDENT, TDMTrainer  # noqa: E402
from diffaccel.pipelines.reference import judge as judges  # noqa: E402
from diffaccel.distill.teacher import teacher_for  # noqa: E402
from diffaccel.pipelines import reference  # noqa: E402

CONFIG = dict(lora_rank=4, batch_size=2, solver_steps=10, warmup_steps=0, learning_rate=1e-2, guidance_scale=4.0)


def digest_of(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(**CONFIG), accelerator=accelerator)
    captions = trainer.data.batch(0, stream_index(trainer, 0), 2)[1]
    losses = [trainer.train_step() for _ in range(2)]
    digest = digest_of(trainer.trainable_state())
    (out / f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"captions": captions, "digest": digest, "losses": losses, "world": accelerator.num_processes}))
    # a wall-clock budget: the ranks must agree on when to stop, and only one writes the student
    distill("reference:image", out / "student", LCDConfig(**CONFIG), max_minutes=0.05, save_every=0.01, progress=False)
    (out / f"done{accelerator.process_index}").write_text("ok")
    # TDM and RG-LCD: no DDP wrapper; their gradients (student, fake score, proxy reward) are all-reduced
    others = {}
    tdm = TDMTrainer(teacher_for(reference.load("image"), 64, 64),
                     TDMConfig(lora_rank=4, batch_size=2, student_steps=2, guidance_scale=4.0, learning_rate=1e-2),
                     accelerator=accelerator)
    tdm_losses = [tdm.train_step() for _ in range(2)]
    others["tdm"] = {"losses": tdm_losses, "captions": tdm.data.batch(0, stream_index(tdm, 0), 2)[1],
                     "student": digest_of(tdm._adapter_state(STUDENT)), "fake": digest_of(tdm._adapter_state(FAKE))}
    rglcd = RGLCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(**CONFIG),
                         RewardConfig(reward_warmup=0), judges.load_judge("image"), accelerator=accelerator)
    rg_losses = [rglcd.train_step() for _ in range(2)]
    others["rg-lcd"] = {"losses": rg_losses, "student": digest_of(rglcd.trainable_state()),
                        "proxy": digest_of(rglcd.proxy.state_dict())}
    distill("reference:image", out / "tdm-student", TDMConfig(lora_rank=4, batch_size=2, student_steps=2),
            method="tdm", max_steps=1, progress=False)
    (out / f"others{accelerator.process_index}.json").write_text(json.dumps(others))

if __name__ == "__main__":
    main()
