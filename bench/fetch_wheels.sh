#!/usr/bin/env bash
# Download, HERE (the GPU machine has no network), the wheels bench/gpu_check.sh unpacks there
# for packages its python3 lacks: pytest (+ pluggy, iniconfig, packaging, pygments) and
# pytest-timeout by default, and bitsandbytes; add more with EXTRA, e.g. EXTRA="pydantic".
# Wheels are for CPython 3.12 on manylinux x86_64 (the GPU machine's python3, BENCH.md).
# bench/wheels/ is not committed; it travels with the working tree to the device machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/bench/wheels"
mkdir -p "$DEST"
# shellcheck disable=SC2086
"${PYTHON:-python3}" -m pip download --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$DEST" pytest pytest-timeout ${EXTRA:-}
# bitsandbytes (quantized bench rows; ~43 MB, its CUDA kernels inside): no deps, the GPU
# machine has torch/numpy/packaging. Everything sent to the device must stay under 64 MiB.
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_24_x86_64 -d "$DEST" "${BNB_SPEC:-bitsandbytes}"
du -sh "$DEST"
ls "$DEST"
