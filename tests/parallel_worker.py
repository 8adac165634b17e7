"""Run under ``torchrun --nproc_per_node=N`` by test_parallel.py: for each scenario, one tiny pipeline per
rank (same seeds, same weights) accelerated with the scenario's config; rank 0 saves the output and the
statistics (or the configuration error) as ``OUT/<name>.npy|.json|.error``. One launch serves all
scenarios, so the processes start only once."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_pipelines import add_lora, build, offload, run, wan22  # noqa: E402

import diffaccel  # noqa: E402


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0
    cases = {}
    for scenario in scenarios:
        name, family = scenario["name"], scenario["family"]
        # A LoRA scenario gets its own pipeline, an offloading one a fresh pipeline (offloading stays on remove).
        key = (family, json.dumps(scenario.get("lora"), sort_keys=True), name if scenario.get("offload") else None)
        if key not in cases:
            made = wan22() if family == "wan22" else build(family)  # wan22: two experts, not one of FAMILIES
            cases[key] = add_lora(made, **scenario["lora"]) if scenario.get("lora") else made
        case = cases[key]
        mode, order = (scenario["offload"] if scenario.get("offload") else (None, None))
        if order == "before":
            offload(case, mode)
        try:
            diffaccel.accelerate(case.pipe, scenario["config"])
        except ValueError as error:
            if rank0:
                (out / f"{name}.error").write_text(str(error))
            continue
        if order == "after":
            offload(case, mode)
        images = run(case, **scenario.get("overrides", {}))
        stats = diffaccel.stats(case.pipe)
        diffaccel.remove(case.pipe)
        if rank0:
            np.save(out / f"{name}.npy", images)
            (out / f"{name}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
