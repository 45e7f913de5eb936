#!/usr/bin/env bash
# Create .venv if missing and install mlorc-dist with its test extras (which include the integrations:
# trl, tensorboard, wandb).
# torch is installed first, pinned, and every later install is constrained to the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLORC_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.mlorc-installed"
want="$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -c constraints.txt "torch==2.13.0"
"$PY" -m pip install --quiet -c constraints.txt -e ".[test]"
"$PY" -c "import torch, deepspeed, transformers, datasets, accelerate, pynvml, trl, tensorboard, wandb; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
