#!/usr/bin/env bash
# Issue 12's one run on a lent GPU machine: the `gpu` tests, then scripts/bench_build.py on >= 5,000 JPEG files.
#
# Run from the repository root there, with wheels of what its image lacks in .whl/ (faiss-cpu, SQLAlchemy,
# greenlet for Python 3.12) and the photos in .devrun/photos (the wallpaper JPEGs, plus the PNG and WebP wallpapers
# re-encoded as JPEG); both carried, both git-ignored. Logs and results go to $OUT (or /tmp/device-out).
#     scripts/device_check.sh [COPIES]     (default 117: 43 photos x 117 = 5,031 files)
# Try it on a CPU machine first with COPIES=1 SMOKE=1 (the gpu tests skip, the bench runs tiny).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
COPIES=${1:-117}
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} 2>&1 | tee "$OUT/env.txt"

# 1. The gpu tests (default and CI runs deselect them): GPU vs CPU decode, bf16/fp16 vs fp32, a GPU build.
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest tests/test_tensor_decode.py -m gpu -o addopts="" -p no:cacheprovider -q -s -rA 2>&1 \
  | tee "$OUT/gpu_tests.log"
echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# 2. The benchmark: decode-only (CPU workers vs the tensor path), model-only per dtype and batch, whole build.
if [ -n "${SMOKE:-}" ]; then
  BENCH=(--arch ruclip-vit-base-patch32-224 --device cpu --tensor-parts --limit 6 --batch-size 8 --workers 1
         --model-dtypes float32 --model-batch-sizes 8 --model-images 16)  # no --compile: minutes on a CPU
else
  BENCH=(--arch ruclip-vit-large-patch14-224 --device cuda --dtype bfloat16 --batch-size 256 --compile
         --workers "$(($(nproc) - 1))" --model-dtypes bfloat16,float16 --model-batch-sizes 128,256,512 --model-images 4096)
fi
timeout "${BENCH_TIMEOUT:-330}" $PY scripts/bench_build.py --photos .devrun/photos --copies "$COPIES" --compare-decode \
  --skip-folder-build "${BENCH[@]}" 2>&1 | tee "$OUT/bench_build.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_build.log"
date -u | tee -a "$OUT/env.txt"
