#!/usr/bin/env bash
# Train a reference denoiser or VAE on the device machine (a GPU, no network) and hand its new weights
# back through $OUT:
#
#     bash scripts/device_train.sh STAGE MINUTES [more train_reference.py options]
#
# STAGE is image or video (the transformer) or image-vae or video-vae (the VAE; a VAE trained anew
# invalidates the denoiser trained on its latents, so retrain that next); MINUTES bounds
# train_reference.py from start-up to its final save (keep it at 8 or less inside the device tool's 10
# minutes). Needs the diffusers wheel in .whl/ (carried: carry=[".whl"]); installs it into $SITE
# (/tmp/site), makes diffaccel importable there the way `pip install -e .` maps it (diffaccel.pipelines ->
# pipelines/, .eval -> eval/), trains with --device cuda (DEVICE=cpu to try this script without a GPU) and
# writes to $OUT, with KIND_COMPONENT = image_transformer, video_transformer, image_vae or video_vae:
#
#     train.log                                             everything printed
#     KIND_COMPONENT.safetensors.part00 [.part01]           the exported weights, in 15 MB pieces
#     KIND_COMPONENT.sha256                                 their checksum, checked when the pieces are joined
#     KIND_COMPONENT_config.json                            COMPONENT/config.json
#     KIND_COMPONENT_training_state.json                    COMPONENT/training_state.json
#
# Back here: bash scripts/device_fetch.sh STAGE DIR (DIR: where the device tool put those files).
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
site=${SITE:-/tmp/site}
cd "$(dirname "$0")/.." || exit 1
root=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out" "$site/diffaccel" || exit 1

# The carried wheels (diffusers; nothing can be downloaded there).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
# diffaccel as installed: a package folder of links (PYTHONPATH=$PWD alone would give no diffaccel.pipelines).
for f in "$root"/diffaccel/*; do ln -sfn "$f" "$site/diffaccel/"; done
for p in pipelines eval; do ln -sfn "$root/$p" "$site/diffaccel/$p"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# (From /: in the repo root python would find the bare diffaccel/ folder first, '' leading sys.path.)
(cd / && python3 - "$site" <<'EOF') || exit 1
import sys
import diffusers, torch, transformers
import diffaccel.pipelines.reference as reference
assert reference.__file__.startswith(sys.argv[1]), f"diffaccel.pipelines.reference from {reference.__file__}"
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"torch {torch.__version__} ({cuda}), diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"diffaccel.pipelines.reference from {reference.__file__}", flush=True)
EOF

weights=pipelines/reference/weights/$kind/$component
before=$(sha256sum "$weights/diffusion_pytorch_model.safetensors" | cut -d' ' -f1)
# A hard stop a little after --minutes, so that the copying below still runs if training overruns.
limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 45 }')
timeout -s INT -k 20 "$limit" \
  python3 scripts/train_reference.py "$stage" --minutes "$minutes" --device "${DEVICE:-cuda}" "$@" 2>&1 | tee "$out/train.log"
status=${PIPESTATUS[0]}
echo "train_reference.py exited with $status"

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
