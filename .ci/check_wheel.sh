#!/usr/bin/env bash
# The package installs on its own: build the wheel and sdist with `python -m build`, install the
# wheel into a fresh virtual environment (torch first, pinned as scripts/setup.sh pins it), and run
# `diffusekit --version` and a few training steps on the built-in digits, with no script of ours.
#   PYTHON      the Python that builds and makes the fresh venv (default: python3)
#   TORCH_SPEC  the torch requirement of the fresh venv (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/build-env"
"$WORK/build-env/bin/python" -m pip install --disable-pip-version-check -q "build>=1.0"
"$WORK/build-env/bin/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; exit 1; }
ls "$WORK/dist"/diffusekit-*.whl "$WORK/dist"/diffusekit-*.tar.gz >/dev/null
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --disable-pip-version-check -q "${TORCH_SPEC:-torch==2.13.0}"
"$WORK/venv/bin/python" -m pip install --disable-pip-version-check -q "$WORK/dist"/diffusekit-*.whl
cd "$WORK"                       # away from the clone: the installed wheel, not src/, answers
"$WORK/venv/bin/diffusekit" --version
"$WORK/venv/bin/diffusekit" train --data digits --out "$WORK/run" --train-steps 3 --seed 0 >"$WORK/train.log" 2>&1 \
  || { tail -30 "$WORK/train.log"; exit 1; }
test -f "$WORK/run/model.safetensors"
echo "wheel check: built, installed in a fresh venv, trained 3 steps on digits"
