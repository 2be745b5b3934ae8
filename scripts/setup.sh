#!/usr/bin/env bash
# Creates ./.venv (once) and installs transkd-fast with its test extras into it.
# On a machine without an NVIDIA GPU the CPU build of torch is pinned first
# (torch==2.13.0: an unpinned torch pulls a multi-GB CUDA build); on a CUDA machine
# whatever torch pip resolves is kept, and the xformers extra is added.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRANSKD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.transkd-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  extras="test,deploy,tensorboard,bench"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="test,xformers,tensorboard"
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  "$PY" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
