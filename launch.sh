#!/usr/bin/env bash
# streamtrain launcher.
#   ./launch.sh alignment [key=value ...]      alignment pre-training (configs/alignment.yaml)
#   ./launch.sh vlm [key=value ...]            VLM QA fine-tuning (configs/vlm_qa.yaml), after alignment
#   ./launch.sh train CONFIG [key=value ...]   train any recipe
#   ./launch.sh ask RUN --image PATH QUESTION   ask a trained VLM (streamtrain ask), e.g. after ./launch.sh vlm
#   ./launch.sh sample          convert the bundled Pixmo-shaped samples into shards under runs/sample/
#   ./launch.sh test [ARGS]     run the test suite (pytest ARGS)
#   ./launch.sh faults [ARGS]   the fault-injection suite at full trial counts; prints its report table
#   ./launch.sh shardify ARGS   run the converter inside the project environment
#   ./launch.sh setup           create .venv from requirements.lock (done automatically when missing)
# Several processes / nodes: NNODES, NODE_RANK, NPROC_PER_NODE (default: GPUs here, else 1),
# MASTER_ADDR, MASTER_PORT; under Slurm they default to SLURM_NNODES, SLURM_NODEID and the
# first host of SLURM_JOB_NODELIST. GPUs run through `accelerate launch`, CPUs through torchrun (gloo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
LOCK=$ROOT/requirements.lock

setup_env() {
  local stamp="$VENV/.lock.sha256"
  local want
  want=$(sha256sum "$LOCK" pyproject.toml "$ROOT/launch.sh" | sha256sum | cut -d' ' -f1)
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "[launch] setting up $VENV from requirements.lock (first run downloads a few GB)" >&2
  local py=${PYTHON:-python3.11}
  command -v "$py" >/dev/null || py=python3
  local uv
  if command -v uv >/dev/null; then
    uv=$(command -v uv)
  else
    "$py" -m venv "$ROOT/.cache/uv-bootstrap"
    "$ROOT/.cache/uv-bootstrap/bin/pip" install --quiet "uv==0.13.8"
    uv=$ROOT/.cache/uv-bootstrap/bin/uv
  fi
  [[ -x "$VENV/bin/python" ]] || "$uv" venv --quiet --python "$py" "$VENV"
  "$uv" pip sync --quiet --python "$VENV/bin/python" "$LOCK"
  "$uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e "$ROOT"
  # open_clip's training pipeline fails on webdataset >= 0.2.96 (docs/converting.md, "Reading the shards
  # elsewhere"); the last version it works with is kept beside the locked one for that test.
  "$uv" pip install --quiet --python "$VENV/bin/python" --no-deps \
    --target "$VENV/compat/webdataset-0.2.86" "webdataset==0.2.86"
  echo "$want" >"$stamp"
}

# Convert the bundled samples (sample/*/{train,eval}.parquet) once; later calls find the manifests.
prepare_samples() {
  local dataset split
  for dataset in sample/*/; do
    dataset=$(basename "$dataset")
    for split in train eval; do
      [[ -f "sample/$dataset/$split.parquet" ]] || continue
      [[ -f "runs/sample/$dataset/$split/manifest.json" ]] && continue
      "$VENV/bin/shardify" parquet-to-tar "sample/$dataset/$split.parquet" \
        --output "runs/sample/$dataset/$split" --max-samples-per-shard 250 --quiet
    done
  done
}

# What third-party libraries would otherwise announce on every start: DeepSpeed that it found no
# GPU, torchrun that it set OMP_NUM_THREADS (one thread per process here, unless the user chose).
quiet_env() {
  if (( $(gpu_count) == 0 )); then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
}

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Run `streamtrain train CONFIG ARGS` as one process, or under a launcher for several.
run_train() {
  local gpus nnodes node_rank nproc master_addr master_port total
  gpus=$(gpu_count)
  nnodes=${NNODES:-${SLURM_NNODES:-1}}
  node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
  nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
  master_addr=${MASTER_ADDR:-}
  if [[ -z "$master_addr" && -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  master_addr=${master_addr:-127.0.0.1}
  master_port=${MASTER_PORT:-29500}
  total=$(( nnodes * nproc ))
  if (( total > 1 && gpus == 0 )) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=1  # what torchrun would set, announcing it in a banner
  fi
  if (( total == 1 )); then
    exec "$VENV/bin/streamtrain" train "$@"
  elif (( gpus > 0 )); then
    exec "$VENV/bin/accelerate" launch --multi_gpu --num_machines "$nnodes" --machine_rank "$node_rank" \
      --num_processes "$total" --main_process_ip "$master_addr" --main_process_port "$master_port" \
      --dynamo_backend no -m streamtrain.cli train "$@"
  elif (( nnodes == 1 )); then
    exec "$VENV/bin/python" -m streamtrain.launch --standalone --nproc_per_node "$nproc" \
      -m streamtrain.cli train "$@"
  else
    exec "$VENV/bin/python" -m streamtrain.launch --nnodes "$nnodes" --node_rank "$node_rank" \
      --nproc_per_node "$nproc" --master_addr "$master_addr" --master_port "$master_port" \
      -m streamtrain.cli train "$@"
  fi
}

cmd=${1:-help}
[[ $# -gt 0 ]] && shift
quiet_env
case "$cmd" in
  setup)
    setup_env
    ;;
  alignment)
    setup_env
    prepare_samples
    run_train configs/alignment.yaml "$@"
    ;;
  vlm)
    setup_env
    prepare_samples
    # The recipe's defaults need the bundled alignment run's encoder and the tiny sample decoder.
    if [[ " $* " != *" model.encoder_checkpoint="* && ! -f runs/alignment/best/model.safetensors ]]; then
      echo "launch.sh vlm: no aligned encoder at runs/alignment/best; run ./launch.sh alignment first" \
        "(or pass model.encoder_checkpoint=PATH)" >&2
      exit 2
    fi
    if [[ " $* " != *" model.decoder="* && ! -f runs/sample/tiny-qwen2/config.json ]]; then
      "$VENV/bin/python" -m streamtrain.models.qwen runs/sample/tiny-qwen2
    fi
    run_train configs/vlm_qa.yaml "$@"
    ;;
  train)
    setup_env
    prepare_samples
    run_train "$@"
    ;;
  sample)
    setup_env
    prepare_samples
    ls -d runs/sample/*/*/
    ;;
  test)
    setup_env
    # Two pytest workers (STREAMTRAIN_TEST_WORKERS; 0: none), each given whole files, so a file's
    # module fixtures (a Ray cluster, a trained run) are made once.
    exec "$VENV/bin/python" -m pytest -n "${STREAMTRAIN_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  faults)
    setup_env
    mkdir -p runs/faults
    report="runs/faults/report-$(date +%Y%m%d-%H%M%S).jsonl"
    status=0
    STREAMTRAIN_FAULTS=full STREAMTRAIN_FAULT_REPORT="$PWD/$report" \
      "$VENV/bin/python" -m pytest tests -m "faults or full" -p no:cacheprovider "$@" || status=$?
    if [[ -s "$report" ]]; then
      "$VENV/bin/python" -m tests.faults.report "$report"
      echo "(records: $report)"
    fi
    exit "$status"
    ;;
  shardify)
    setup_env
    exec "$VENV/bin/shardify" "$@"
    ;;
  ask)
    setup_env
    exec "$VENV/bin/streamtrain" ask "$@"
    ;;
  help|-h|--help)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "launch.sh: unknown command '$cmd' (try: alignment, vlm, train, ask, sample, test, faults, shardify, setup)" >&2
    exit 2
    ;;
esac
