#!/usr/bin/env bash
# Put the weights that scripts/device_train.sh left in the device tool's $OUT back in place here:
#
#     bash scripts/device_fetch.sh STAGE DIR
#
# STAGE is image, video, image-vae or video-vae; DIR holds KIND_COMPONENT.safetensors.part*,
# KIND_COMPONENT.sha256, KIND_COMPONENT_config.json and KIND_COMPONENT_training_state.json (as
# device_train.sh names them). The joined file is checked against the checksum before it replaces
# pipelines/reference/weights/KIND/COMPONENT/. A local work/reference/STAGE/checkpoint.pt of fewer steps is
# ignored by the next train_reference.py run. WEIGHTS_ROOT=DIR puts a candidate's weights into
# DIR/KIND/COMPONENT instead (as device_train.sh was run).
set -euo pipefail

usage="usage: bash scripts/device_fetch.sh image|video|image-vae|video-vae DIR"
stage=${1:?$usage}
dir=${2:?$usage}
case "$stage" in
  image | video) kind=$stage component=transformer ;;
  image-vae | video-vae) kind=${stage%-vae} component=vae ;;
  *) echo "device_fetch.sh: STAGE must be image, video, image-vae or video-vae ($usage)" >&2; exit 2 ;;
esac
prefix=${kind}_${component}
dir=$(cd "$dir" && pwd)
cd "$(dirname "$0")/.."
weights=${WEIGHTS_ROOT:-pipelines/reference/weights}/$kind/$component
mkdir -p "$weights"

shopt -s nullglob
parts=("$dir/${prefix}.safetensors.part"*)
if [ ${#parts[@]} -eq 0 ]; then
  echo "device_fetch.sh: no ${prefix}.safetensors.part* in $dir" >&2
  exit 1
fi
for f in "${prefix}.sha256" "${prefix}_config.json" "${prefix}_training_state.json"; do
  [ -f "$dir/$f" ] || { echo "device_fetch.sh: $dir/$f is missing" >&2; exit 1; }
done

tmp=$(mktemp "$weights/.fetch.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cat "${parts[@]}" >"$tmp" # the glob sorts part00, part01, ...
expected=$(tr -d '[:space:]' <"$dir/${prefix}.sha256")
actual=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
  echo "device_fetch.sh: checksum mismatch ($actual, expected $expected): nothing replaced" >&2
  exit 1
fi
chmod 644 "$tmp"
mv "$tmp" "$weights/diffusion_pytorch_model.safetensors"
install -m 644 "$dir/${prefix}_config.json" "$weights/config.json"
install -m 644 "$dir/${prefix}_training_state.json" "$weights/training_state.json"
echo "device_fetch.sh: $weights updated:"
cat "$weights/training_state.json"
