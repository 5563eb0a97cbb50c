#!/usr/bin/env bash
# Download, HERE (the GPU machine has no network), the wheels bench/gpu_check.sh unpacks there
# for packages its python3 lacks: pytest (+ pluggy, iniconfig, packaging, pygments) and
# pytest-timeout by default, bitsandbytes, and xgrammar with its pure deps; add more with EXTRA.
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
# xgrammar (tests/gpu/test_structured_outputs_gpu.py; ~7 MB with its deps): no deps resolved
# (they would pull torch); the ones the GPU machine lacks are listed. Stop 17 ran it so.
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$DEST" "${XGRAMMAR_SPEC:-xgrammar}" apache-tvm-ffi \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
du -sh "$DEST"
ls "$DEST"
