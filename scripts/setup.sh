#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install diffusekit into it.
#   TORCH_SPEC  the torch requirement to install first (default: torch==2.13.0, the CPU wheel on
#               this kind of machine). GPU users: TORCH_SPEC="torch==2.13.0" with their CUDA index,
#               e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
#   EXTRAS      pip extras to install (default: test,peers,text,hf,demo,browser,tensorboard,wandb,launch,finetune — what the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,peers,text,hf,demo,browser,tensorboard,wandb,launch,finetune}
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_SPEC"
fi
# torch is already satisfied, so this never pulls another (CUDA) build
pip_install -e ".[${EXTRAS}]"
