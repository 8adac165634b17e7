# Sourced by the device-machine scripts (device_train.sh, device_check.sh): make diffaccel importable there
# as `pip install -e .` maps it, with the carried wheels (diffusers; nothing can be downloaded there).
#
#     source scripts/device_env.sh    # from the repository root; sets PYTHONPATH, SITE and the offline env
#
# Installs .whl/*.whl (carried: carry=[".whl"]) into $SITE (/tmp/site), links diffaccel's package folders
# there (diffaccel.pipelines -> pipelines/, .eval -> eval/) and prints the versions it found. Returns 1 on
# failure. Run Python from outside the repository root afterwards: there '' leads sys.path and the bare
# diffaccel/ folder (no .pipelines) would be found first.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
SITE=${SITE:-/tmp/site}
export SITE
mkdir -p "$SITE/diffaccel" || return 1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
fi
for f in "$PWD"/diffaccel/*; do ln -sfn "$f" "$SITE/diffaccel/"; done
for p in pipelines eval; do ln -sfn "$PWD/$p" "$SITE/diffaccel/$p"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
(cd / && python3 - "$SITE" <<'PY') || return 1
import sys
import diffusers, torch, transformers
import diffaccel.pipelines.reference as reference
assert reference.__file__.startswith(sys.argv[1]), f"diffaccel.pipelines.reference from {reference.__file__}"
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"torch {torch.__version__} ({cuda}), diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"diffaccel.pipelines.reference from {reference.__file__}", flush=True)
PY
