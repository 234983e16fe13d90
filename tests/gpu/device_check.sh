#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine from the repository root):
#   the packages the machine lacks come as wheels in .whl/ (see README, Development),
#   then `pytest -m gpu` runs the GPU tests; logs and figures land in $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions OUT
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, transformers, accelerate, deepspeed; print(torch.__version__, transformers.__version__, accelerate.__version__, deepspeed.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider --timeout 500 "$@" 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
# Both decode paths side by side (bytes-only workers decode on this GPU); short, after the tests.
timeout 240 python3 benchmarks/bench_loader.py --workers 8 --samples 3000 --resume-samples 0 --epochs 0 \
  --mixtures 0 --replan-shards 0 --json "$OUT/bench_loader.json" 2>&1 | tee "$OUT/bench_loader.log"
exit "$status"
