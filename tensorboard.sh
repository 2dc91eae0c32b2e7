#!/usr/bin/env bash
# Start TensorBoard on the runs: ./tensorboard.sh [PORT] [SUBDIR]   (defaults: 6006, runs/)
# e.g. ./tensorboard.sh 6007 runs/my_run_name
set -euo pipefail
cd "$(dirname "$0")"
port="${1:-6006}"
logdir="${2:-runs}"
mkdir -p "$logdir"
tensorboard=".venv/bin/tensorboard"
[ -x "$tensorboard" ] || tensorboard="tensorboard"
exec "$tensorboard" --logdir "$logdir" --port "$port" --bind_all
