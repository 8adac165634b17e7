#!/usr/bin/env bash
# The device tool sends the working tree (64 MiB at most), and the shipped weights put it over that. Move the
# weights a device run does not need out of the checkout before the call and back after it:
#
#     bash scripts/device_trim.sh away    # before the device call (prints the size that will travel)
#     bash scripts/device_trim.sh back    # after it, always
#     TRIM_EXTRA="path ..." bash scripts/device_trim.sh away|back   # move these too
#
# Kept: the image and video models, the upscaler, the judge and the turbo student (image-tdm-ms), which
# device_check.sh and device_train.sh use. Moved (to $TRIM, /tmp/diffaccel_trim): the other students, the
# 15-step upscaler and the upscale baselines (a candidate in scripts/weights/next travels). `git status` shows them deleted until `back`.
set -euo pipefail
usage="usage: bash scripts/device_trim.sh away|back"
trim=${TRIM:-/tmp/diffaccel_trim}
cd "$(dirname "$0")/.."
paths=(scripts/weights/upscale_baselines pipelines/reference/weights/upscale15 pipelines/reference/weights/image-tdm
       pipelines/reference/weights/image-rglcd pipelines/reference/weights/image-lcd)
# More to move, e.g. the shipped video transformer while a candidate with a transformer of its own trains:
# TRIM_EXTRA="pipelines/reference/weights/video/transformer" (give the same value to 'back').
read -r -a extra <<<"${TRIM_EXTRA:-}"
paths+=("${extra[@]}")
case "${1:?$usage}" in
  away)
    for p in "${paths[@]}"; do
      [ -e "$p" ] || continue
      [ -e "$trim/$p" ] && { echo "device_trim.sh: $trim/$p exists: run 'back' first" >&2; exit 1; }
      mkdir -p "$trim/$(dirname "$p")" && mv "$p" "$trim/$p"
    done
    echo "to travel: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes tracked" \
         "+ $(du -cb .whl 2>/dev/null | tail -1 | cut -f1) bytes of .whl (limit 67108864)" ;;
  back)
    for p in "${paths[@]}"; do
      [ -e "$trim/$p" ] || continue
      [ -e "$p" ] && { echo "device_trim.sh: both $p and $trim/$p exist; keeping $p" >&2; continue; }
      mkdir -p "$(dirname "$p")" && mv "$trim/$p" "$p"
    done
    git status --short -- "${paths[@]}" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
