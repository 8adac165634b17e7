#!/usr/bin/env bash
# On the device machine (a GPU, no network; carry=[".whl"] with the diffusers wheel): run
# scripts/device_check.py (every method on every tiny family, the Triton kernel, the user's commands on
# CUDA) and the GPU kernel benchmark, and leave their reports in $OUT:
#
#     bash scripts/device_check.sh [device_check.py options]
#
# Here, around the call: `bash scripts/device_trim.sh away` (the checkout is over the tool's 64 MiB), then
# `bash scripts/device_trim.sh back`. $OUT gets device_check.{md,json,log} and sparse_attention_gpu.{md,json} with bench.log (six files; the
# device tool brings back at most eight). The exit status is device_check.py's.
set -uo pipefail
out=${OUT:?device_check.sh: OUT is not set (the device tool sets it; give a folder to try it elsewhere)}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out" || exit 1
source scripts/device_env.sh || exit 1
root=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
(cd / && timeout 150 python3 "$root/scripts/bench_sparse_attention.py" gpu --out "$out/sparse_attention_gpu.md") \
  >"$out/bench.log" 2>&1 || echo "bench_sparse_attention.py failed: $(tail -3 "$out/bench.log")"
(cd / && python3 "$root/scripts/device_check.py" --out "$out" "$@") 2>&1 | tee "$out/device_check.log"
status=${PIPESTATUS[0]}
exit "$status"
