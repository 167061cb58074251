#!/usr/bin/env bash
# Fill .whl/ with exactly the wheels the GPU path needs on the lent GPU machine (docs/performance.md, "To run on a
# GPU"): Python 3.12, manylinux x86_64, no package registry there. The machine already has torch 2.11, torchvision,
# transformers 5.x, peft, accelerate, safetensors, huggingface_hub 1.33, tokenizers, sentencepiece, numpy, scipy,
# matplotlib, pyarrow, tensorboard, pillow, pyyaml, tqdm, xxhash, pytest (the device tool's KINDS.md); it lacks:
#   diffusers 0.39.0        the transformer, VAE, pipelines (its needs, huggingface_hub<2 and the rest, are there)
#   importlib_metadata      diffusers imports it unconditionally (+ zipp, which is there)
#   mosaicml-streaming      the demo and the toy proof read MDS shards (--no-deps: only what it imports at runtime)
#   zstd, python-snappy+cramjam, brotli   streaming's compression module imports all three at import time
#   catalogue               streaming's registry imports it
#   torchao 0.18.0          model.base_quant (the bench-512-int8/float8 rows); needs torch >= 2.11, pure-Python use
# Not carried: deepspeed, submitit, boto3/azure/gcs/oci/paramiko (streaming imports its cloud clients
# only for a remote; the GPU session reads local shards).
#
#   bash bench/gpu_wheels.sh [DEST]     # default DEST: .whl (ignored by git); prints the set's total size
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}

# name==version as pinned in constraints.txt (the versions our CPU tests run), one line each.
WHEELS=(
  diffusers==0.39.0
  importlib_metadata==10.2.0
  mosaicml-streaming==0.13.0
  zstd==1.5.7.2
  python-snappy==0.7.3
  cramjam==2.14.0
  brotli==1.2.1
  catalogue==2.0.10
  torchao==0.18.0
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# pip matches manylinux tags exactly: offer every glibc the machine can run (zstd's wheel, for one, is 2_14).
platforms=()
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"

ls -1 "$DEST"/*.whl
count=$(ls -1 "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $count (two versions of one stop the install)" >&2
  exit 1
fi
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $count wheels, $((bytes / 1024)) KiB in $DEST (the device tool carries at most 64 MiB in all)"
