#!/usr/bin/env bash
# The one-shot GPU session (docs/performance.md, "To run on a GPU"): install the carried wheels, check every import,
# print the versions and the GPU, then run bench/gpu_session.py (arguments pass through: --dry, --budget, --only).
#
#   bash bench/gpu_session.sh                 # on the GPU machine, through the device tool with carry [".whl"]
#   GPU_WHEELS=none bash bench/gpu_session.sh --dry --out /tmp/gpu_dry    # CPU rehearsal in this venv
#
# GPU_WHEELS: the wheel folder (default .whl; "none" installs nothing); GPU_SITE: where they go (default /tmp/site);
# PYTHON: the interpreter (default python3, the one that holds torch on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/site}

if [ "$WHEELS" != none ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_session: no wheels in $WHEELS: run bash bench/gpu_wheels.sh first and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_session: installing the wheels from $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# Fail fast, in seconds, on anything the GPU path imports (no GPU minute lost to an ImportError later).
"$PY" - <<'PYEOF' || exit 3
import importlib, platform, sys
missing = []
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "streaming", "scipy",
             "yaml", "tensorboard", "PIL", "tqdm", "pytest", "matplotlib", "pyarrow", "sentencepiece"):
    try:
        m = importlib.import_module(name)
        print(f"gpu_session: {name} {getattr(m, '__version__', '')}")
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
try:  # the modules each step imports, with what they import in turn
    for name in ("train.trainer", "evals.periodic", "train.data", "evals.experiments.proof", "launch.cli"):
        importlib.import_module(name)
    from train.data import _train_samples_class
    _train_samples_class()  # streaming's StreamingDataset, with its compression and storage modules
except Exception as e:
    missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("gpu_session: missing import: " + "; ".join(missing) + " -- add its wheel to bench/gpu_wheels.sh",
          file=sys.stderr)
    sys.exit(3)
import torch
print(f"gpu_session: python {platform.python_version()}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PYEOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
exec "$PY" bench/gpu_session.py "$@"
