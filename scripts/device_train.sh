#!/usr/bin/env bash
# Train a reference denoiser or VAE on the device machine (a GPU, no network) and hand its new weights
# back through $OUT:
#
#     bash scripts/device_train.sh STAGE MINUTES [more train_reference.py options]
#
# STAGE is image or video (the transformer) or image-vae or video-vae (the VAE; a VAE trained anew
# invalidates the denoiser trained on its latents, so retrain that next); MINUTES bounds
# train_reference.py from start-up to its final save (keep it at 8 or less inside the device tool's 10
# minutes). Needs the diffusers wheel in .whl/ (carried: carry=[".whl"]), which scripts/device_env.sh
# installs into $SITE (/tmp/site) next to diffaccel as `pip install -e .` maps it; the checkout is over the
# tool's 64 MiB, so run `bash scripts/device_trim.sh away` here before the call and `back` after it. Trains
# with --device cuda (DEVICE=cpu to try this script without a GPU) and writes to $OUT, with KIND_COMPONENT
# = image_transformer, video_transformer, image_vae or video_vae:
#
#     train.log                                             everything printed
#     KIND_COMPONENT.safetensors.part00 [.part01]           the exported weights, in 15 MB pieces
#     KIND_COMPONENT.sha256                                 their checksum, checked when the pieces are joined
#     KIND_COMPONENT_config.json                            COMPONENT/config.json
#     KIND_COMPONENT_training_state.json                    COMPONENT/training_state.json
#
# Back here: bash scripts/device_fetch.sh STAGE DIR (DIR: where the device tool put those files).
#
# WEIGHTS_ROOT=DIR trains a candidate beside the shipped models (train_reference.py --weights DIR), e.g. the
# denoiser on a new VAE: WEIGHTS_ROOT=scripts/weights/next bash scripts/device_train.sh video 8; give the
# same WEIGHTS_ROOT to device_fetch.sh.
set -uo pipefail

usage="usage: bash scripts/device_train.sh image|video|image-vae|video-vae MINUTES [train_reference.py options]"
stage=${1:?$usage}
minutes=${2:?$usage}
shift 2
case "$stage" in
  image | video) kind=$stage component=transformer ;;
  image-vae | video-vae) kind=${stage%-vae} component=vae ;;
  *) echo "device_train.sh: STAGE must be image, video, image-vae or video-vae ($usage)" >&2; exit 2 ;;
esac
prefix=${kind}_${component}
out=${OUT:?device_train.sh: OUT is not set (the device tool sets it; give a folder to try it elsewhere)}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out" || exit 1
source scripts/device_env.sh || exit 1

root=${WEIGHTS_ROOT:-pipelines/reference/weights}
weights=$root/$kind/$component
before=none  # a candidate's first run has no weights of this component yet
[ -f "$weights/diffusion_pytorch_model.safetensors" ] &&
  before=$(sha256sum "$weights/diffusion_pytorch_model.safetensors" | cut -d' ' -f1)
# A hard stop a little after --minutes, so that the copying below still runs if training overruns.
limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 45 }')
timeout -s INT -k 20 "$limit" \
  python3 scripts/train_reference.py "$stage" --minutes "$minutes" --device "${DEVICE:-cuda}" --weights "$root" "$@" 2>&1 |
  tee "$out/train.log"
status=${PIPESTATUS[0]}
echo "train_reference.py exited with $status"

after=none
[ -f "$weights/diffusion_pytorch_model.safetensors" ] &&
  after=$(sha256sum "$weights/diffusion_pytorch_model.safetensors" | cut -d' ' -f1)
if [ "$after" = "$before" ]; then
  echo "device_train.sh: the $kind $component did not change: nothing to bring back" >&2
  exit $((status == 0 ? 1 : status))
fi
split -b 15000000 -d -a 2 "$weights/diffusion_pytorch_model.safetensors" "$out/${prefix}.safetensors.part"
echo "$after" >"$out/${prefix}.sha256"
cp "$weights/config.json" "$out/${prefix}_config.json"
cp "$weights/training_state.json" "$out/${prefix}_training_state.json"
cat "$weights/training_state.json"
ls -l "$out"
exit "$status"
