"""Write procedural scenes as a captioned image folder (``metadata.jsonl`` with ``file_name`` and ``text``,
the imagefolder layout of Hugging Face ``datasets``), the data format ``diffaccel distill --data`` reads.

    python scripts/export_scenes.py work/scenes64 --num 8192 --resolution 64

With the reference image model saved as a folder, this lets the path a user's own teacher takes be tried on
the reference model: ``diffaccel distill --teacher pipelines/reference/weights/image --data work/scenes64``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffaccel.pipelines.reference import scenes


def export(out: Path, num: int, resolution: int, seed: int, chunk: int = 256) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose a new folder.")
    rows = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        pixels, captions, _ = scenes.sample_batch(np.random.default_rng([seed, start]), n, resolution)
        for i, (image, caption) in enumerate(zip(pixels, captions)):
            name = f"{start + i:06d}.png"
            Image.fromarray((image * 255).round().astype(np.uint8)).save(out / name)
            rows.append(json.dumps({"file_name": name, "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=8192)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=31337, help="differs from the bench prompts' seed")
    args = parser.parse_args()
    print(f"wrote {args.num} scenes to {export(args.out, args.num, args.resolution, args.seed)}")


if __name__ == "__main__":
    main()
