#!/usr/bin/env bash
# Every number the README and the issue notes quote for the reference image model, in one go
# (about 45 minutes on a 2-core CPU). Results land in docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
python scripts/eval_reference.py image --num 200 --threads "$T"
python scripts/eval_reference.py image --num 200 --guidance 1.0 --threads "$T"
python scripts/bench_cache.py --model image --steps 28 --num 6 --repeats 2 --threads "$T"
python scripts/bench_guidance.py --num 16 --repeats 2 --fit-num 8 --threads "$T"
python scripts/bench_bottleneck.py --num 16 --repeats 1 --threads "$T"
mkdir -p work/eval
[ -f work/eval/real_image.npz ] || diffaccel eval fid-stats --procedural image --num 1000 -o work/eval/real_image.npz
diffaccel eval fid --model image --prompt-set reference-image --num 1000 --real-stats work/eval/real_image.npz \
    --samples work/eval/fid_image_samples --out docs/fid_image.json
diffaccel bench --model image --configs off,safe,fast,turbo --num 16 --repeats 2 --out docs/bench_image
diffaccel eval vbench --model video --prompt-set reference-video --num 50 --out docs/vbench_video.json
python - <<'PY'   # ground-truth clips of the same 50 prompts, for scale
from pathlib import Path
from diffaccel.eval.samples import write_sample
from diffaccel.pipelines.reference import scenes
out = Path("work/eval/gt_clips"); out.mkdir(parents=True, exist_ok=True)
for i, text in enumerate(scenes.prompt_set(50, clip=True)):
    write_sample(out / f"{i:08d}.npz", scenes.render_clip(scenes.parse_caption(text), 64, 9))
PY
diffaccel eval vbench --videos work/eval/gt_clips --out docs/vbench_procedural_clips.json
python scripts/bench_cache.py --model image --steps 50 --num 4 --repeats 1 --threads "$T"
