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
# bitsandbytes: moshi's int8 layers (`--int8`; WITH_INT8=0 leaves it out), slimmed to the CPU library and the
# one CUDA library the GPU machine's torch loads (BNB_CUDA, default 130 for torch 2.11+cu130): the
# published wheel holds one per CUDA and ROCm version, 43 MB, which with the rest would pass the 64 MiB
# the device tool carries; slimmed it is 3.6 MB.
BNB=bitsandbytes==0.50.2
if [[ ${WITH_INT8:-1} == 1 ]]; then WHEELS+=("$BNB"); fi
mkdir -p "$DIR"
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
if [[ ${WITH_INT8:-1} == 1 ]]; then
  "$PY" - "$DIR"/bitsandbytes-*.whl "${BNB_CUDA:-130}" <<'PY'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

wheel, cuda = Path(sys.argv[1]), sys.argv[2]
keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [n for n in src.namelist() if not n.endswith(".so") or keep.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = src.read(name)
        dst.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
slim.replace(wheel)
PY
fi
du -sh "$DIR"
