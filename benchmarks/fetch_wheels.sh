#!/usr/bin/env bash
# Download the Python wheels the GPU machine lacks (humming-kernels, fla-core) into carry/wheels (the GPU machine has no network;
# the lead passes carry/wheels to it with `carry`, and benchmarks/gpu_check.sh installs them).
#
# humming-kernels ships one cp310-abi3 manylinux_2_28 x86_64 wheel: it serves every CPython >= 3.10
# (the GPU image has 3.12). Its dependencies (torch, triton, numpy, safetensors, jinja2,
# cuda-bindings, tqdm, tabulate, filelock, packaging) are all in the GPU image already
# (/work/.library/device/KINDS.md, "Python packages already there"), so only the wheel itself is fetched.
#
# Usage: bash benchmarks/fetch_wheels.sh        (HUMMING_VERSION=x.y.z to pick another version)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/carry/wheels
HUMMING_VERSION=${HUMMING_VERSION:-0.1.19}
mkdir -p "$DEST"

for py in 3.10 3.11 3.12 3.13; do  # abi3: the same file satisfies every version; stop at the first hit
  if python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --abi abi3 \
       --platform manylinux_2_28_x86_64 --python-version "$py" -d "$DEST" "humming-kernels==$HUMMING_VERSION"; then
    break
  fi
done

# fla-core (pure Python + Triton, py3-none-any): the Gated-DeltaNet kernels transformers uses for
# Qwen3.5/3.6's linear attention when the package is importable (bench_e2e.py). Its one dependency,
# einops, is in the GPU image.
FLA_VERSION=${FLA_VERSION:-0.6.0}
python3 -m pip download --quiet --no-deps -d "$DEST" "fla-core==$FLA_VERSION"

echo "carry/wheels now holds:"
ls -l "$DEST"
du -sh "$DEST"
total=$(du -sm "$DEST" | cut -f1)
if [ "$total" -gt 40 ]; then
  echo "WARNING: carry/wheels is ${total} MB (> 40 MB)" >&2
fi
