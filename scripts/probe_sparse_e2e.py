"""Quick end-to-end probe of sparse-attention configs on the reference video model at a long sequence.

One prompt, one seed, guidance 1 unless ``--guidance G`` comes first: wall time of a dense call, then of each config, and the
PSNR of its decoded clip against the dense one. A tuning aid; ``diffaccel bench`` gives the full
measurement (CFG, many prompts, adherence).

    python scripts/probe_sparse_e2e.py [--guidance G] HEIGHT FRAMES STEPS CONFIG[:JSON_OVERRIDES] ...
    python scripts/probe_sparse_e2e.py 192 33 10 docs/configs/sparse_asa_long.yaml \\
        'docs/configs/sparse_asa_long.yaml:{"block_size":128,"max_density":0.2}'
"""

import json
import sys
import time

import numpy as np
import torch

import diffaccel
from diffaccel.pipelines import reference


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    guidance = 1.0
    if argv[0] == "--guidance":
        guidance, argv = float(argv[1]), argv[2:]
    height, frames, steps = (int(x) for x in argv[:3])
    pipe = reference.load("video")
    kwargs = reference.call_defaults("video")
    kwargs.update(height=height, width=height, num_frames=frames, num_inference_steps=steps, output_type="np", guidance_scale=guidance)

    def run():
        start = time.perf_counter()
        clip = pipe("a small red circle moving right, on a blue background", generator=torch.Generator().manual_seed(0), **kwargs)
        return time.perf_counter() - start, clip.frames[0]

    base_seconds, base = run()
    print(f"dense {base_seconds:.1f}s", flush=True)
    for spec in argv[3:]:
        path, _, overrides = spec.partition(":")
        config = diffaccel.AccelConfig.from_file(path).to_dict()
        if overrides:
            config["attention"].update(json.loads(overrides))
        diffaccel.accelerate(pipe, diffaccel.AccelConfig.from_dict(config))
        seconds, clip = run()
        stats = diffaccel.stats(pipe)
        psnr = 10 * np.log10(1 / max(float(np.mean((clip - base) ** 2)), 1e-12))
        kept = stats.get("attention_blocks_kept", 0) / max(1, stats.get("attention_blocks_total", 1))
        print(f"{spec}: {seconds:.1f}s, speedup {base_seconds / seconds:.2f}x, PSNR {psnr:.1f} dB, blocks kept {kept:.3f}", flush=True)
        diffaccel.remove(pipe)


if __name__ == "__main__":
    main(sys.argv[1:])
