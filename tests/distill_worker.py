"""Run under ``torchrun --nproc_per_node=2`` by test_distill_parallel.py: LCD data parallel on the reference
image model. Each rank writes the captions of its first batch and a digest of its LoRA weights after two
steps (``OUT/rank<i>.json``), then all ranks run ``distill()`` on a time budget into ``OUT/student``."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator  # noqa: E402

from diffaccel.distill import LCDConfig, TDMConfig, distill  # noqa: E402
from diffaccel.distill.lcd import LCDTrainer, stream_index  # noqa: E402
from diffaccel.distill.teacher import teacher_for  # noqa: E402
from diffaccel.pipelines import reference  # noqa: E402

CONFIG = dict(lora_rank=4, batch_size=2, solver_steps=10, warmup_steps=0, learning_rate=1e-2, guidance_scale=4.0)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(**CONFIG), accelerator=accelerator)
    captions = trainer.data.batch(0, stream_index(trainer, 0), 2)[1]
    losses = [trainer.train_step() for _ in range(2)]
    state = trainer.trainable_state()
    digest = hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest()
    (out / f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"captions": captions, "digest": digest, "losses": losses, "world": accelerator.num_processes}))
    # a wall-clock budget: the ranks must agree on when to stop, and only one writes the student
    distill("reference:image", out / "student", LCDConfig(**CONFIG), max_minutes=0.05, save_every=0.01, progress=False)
    (out / f"done{accelerator.process_index}").write_text("ok")
    refusals = {}
    for method, config in (("rg-lcd", LCDConfig(**CONFIG)), ("tdm", TDMConfig(lora_rank=4, batch_size=2, guidance_scale=4.0))):
        try:
            distill("reference:image", out / f"{method}-{accelerator.process_index}", config, method=method, max_steps=1,
                    progress=False)
        except NotImplementedError as error:
            refusals[method] = str(error)
    (out / f"refusals{accelerator.process_index}.json").write_text(json.dumps(refusals))


if __name__ == "__main__":
    main()
