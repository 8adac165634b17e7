#!/usr/bin/env bash
# Put the weights that scripts/device_train.sh left in the device tool's $OUT back in place here:
#
#     bash scripts/device_fetch.sh STAGE DIR
#
# STAGE is image or video; DIR holds STAGE_transformer.safetensors.part*, STAGE_transformer.sha256,
# STAGE_transformer_config.json and STAGE_transformer_training_state.json. The joined file is checked
# against the checksum before it replaces pipelines/reference/weights/STAGE/transformer/. A local
# work/reference/STAGE/checkpoint.pt of fewer steps is ignored by the next train_reference.py run.
set -euo pipefail

usage="usage: bash scripts/device_fetch.sh image|video DIR"
stage=${1:?$usage}
dir=${2:?$usage}
case "$stage" in
  image | video) ;;
  *) echo "device_fetch.sh: STAGE must be image or video ($usage)" >&2; exit 2 ;;
esac
dir=$(cd "$dir" && pwd)
cd "$(dirname "$0")/.."
weights=pipelines/reference/weights/$stage/transformer

shopt -s nullglob
parts=("$dir/${stage}_transformer.safetensors.part"*)
if [ ${#parts[@]} -eq 0 ]; then
  echo "device_fetch.sh: no ${stage}_transformer.safetensors.part* in $dir" >&2
  exit 1
fi
for f in "${stage}_transformer.sha256" "${stage}_transformer_config.json" "${stage}_transformer_training_state.json"; do
  [ -f "$dir/$f" ] || { echo "device_fetch.sh: $dir/$f is missing" >&2; exit 1; }
done

tmp=$(mktemp "$weights/.fetch.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cat "${parts[@]}" >"$tmp" # the glob sorts part00, part01, ...
expected=$(tr -d '[:space:]' <"$dir/${stage}_transformer.sha256")
actual=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
  echo "device_fetch.sh: checksum mismatch ($actual, expected $expected): nothing replaced" >&2
  exit 1
fi
chmod 644 "$tmp"
mv "$tmp" "$weights/diffusion_pytorch_model.safetensors"
install -m 644 "$dir/${stage}_transformer_config.json" "$weights/config.json"
install -m 644 "$dir/${stage}_transformer_training_state.json" "$weights/training_state.json"
echo "device_fetch.sh: $weights updated:"
cat "$weights/training_state.json"
