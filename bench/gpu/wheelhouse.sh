#!/usr/bin/env bash
# Build the wheelhouse that bench/gpu/run.sh installs on a GPU machine that has only torch (and the
# packages of the device image: numpy, safetensors, sentencepiece, einops, huggingface-hub, typing-extensions).
# Wheels for that machine's Python and platform, no dependencies resolved: every one is named here.
# Usage: bench/gpu/wheelhouse.sh [DIR] (default .whl, which .gitignore ignores: the device tool carries it). `make gpu-wheelhouse`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
# What the benchmark imports beyond the device image: moshi (installed --no-deps: its torch<2.10,
# sounddevice and bitsandbytes pins are not needed to run its models), this project's settings and
# audio modules (pydantic, pydantic-settings, soxr, sphn) and what those need.
WHEELS=(
  moshi==0.2.13
  sphn==0.2.1
  soxr==1.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  annotated-types==0.8.0
  typing-inspection==0.4.5
  python-dotenv==1.2.4
  typing-extensions==4.16.0  # the image has one; pydantic wants a recent one, this is the version tested here
)
# No bitsandbytes: `--weights int8` (and moshi's `-q8` checkpoints) run on torch's own int8 kernels
# (services/dialogue/quantized.py).
mkdir -p "$DIR"
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
du -sh "$DIR"
