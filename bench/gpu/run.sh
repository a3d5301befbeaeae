#!/usr/bin/env bash
# The dialogue sessions-per-GPU sweep in one command, on a machine that has only torch:
#   bench/gpu/run.sh [options of python -m bench.gpu_sessions]
# Installs the wheelhouse (WHEELHOUSE, default .whl, built by `make gpu-wheelhouse`) with --no-index
# into a private target (nothing is fetched), then runs the sweep. Results: $OUT/dialogue_gpu.json when
# OUT is set (the device tool's folder), else bench/results/dialogue_gpu.json, rewritten after every point.
# Without a wheelhouse it runs on the interpreter's own packages (the CPU proof in tests/bench).
# BENCH_MODULE runs another of the GPU benchmarks the same way (bench.gpu_int8_attention).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  SITE=${SITE:-/tmp/chorus-gpu-site}
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELHOUSE"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda"
print(f"python {platform.python_version()}, torch {torch.__version__}, {gpu}", flush=True)
PY
exec "$PYTHON" -m "${BENCH_MODULE:-bench.gpu_sessions}" "$@"
