#!/usr/bin/env bash
# streamtrain launcher.
#   ./launch.sh sample          convert the bundled Pixmo-shaped sample into shards under runs/sample/
#   ./launch.sh test [ARGS]     run the test suite (pytest ARGS)
#   ./launch.sh shardify ARGS   run the converter inside the project environment
#   ./launch.sh setup           create .venv from requirements.lock (done automatically when missing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
LOCK=$ROOT/requirements.lock

setup_env() {
  local stamp="$VENV/.lock.sha256"
  local want
  want=$(sha256sum "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
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
  echo "$want" >"$stamp"
}

cmd=${1:-help}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup)
    setup_env
    ;;
  sample)
    setup_env
    exec "$VENV/bin/shardify" parquet-to-tar sample/pixmo_digits_caption.parquet \
      --output runs/sample/shards --max-samples-per-shard 500 "$@"
    ;;
  test)
    setup_env
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  shardify)
    setup_env
    exec "$VENV/bin/shardify" "$@"
    ;;
  help|-h|--help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "launch.sh: unknown command '$cmd' (try: sample, test, shardify, setup)" >&2
    exit 2
    ;;
esac
