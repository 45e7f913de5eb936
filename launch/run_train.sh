#!/usr/bin/env bash
# One node, driven by environment variables:
#   ENGINE=fsdp2|deepspeed NPROC=8 CONFIG=ds_configs/mlorc.json bash launch/run_train.sh --model 100m --steps 1000
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-fsdp2}
NPROC=${NPROC:-1}
PY=${PYTHON:-.venv/bin/python}
if [ "$ENGINE" = deepspeed ]; then
  exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" launch/train.py --deepspeed "${CONFIG:-ds_configs/mlorc.json}" "$@"
fi
exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" launch/train.py --fsdp "$@"
