#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch and era_compile installed.
# torch goes in first, pinned to the local CPU build, so that resolving the package's
# `torch>=2.11` never pulls multi-GB CUDA wheels. A torch already importable (a GPU image
# with its own build) is kept: the venv sees system packages. Everything else is installed
# at the exact versions the suite last passed with (constraints.txt, written by scripts/lock.py),
# so a fresh machine gets what CI ran, not whatever was released since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet torch==2.13.0
fi
# triton (Linux only) lets the suite run our Triton kernel through its CPU interpreter
if ! "$VPY" -c "import sys, era_compile, transformers, pytest, xdist, matplotlib, ruff, mypy; sys.platform != 'linux' or __import__('triton')" \
    >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet -c constraints.txt -e ".[test]"
fi
"$VPY" -c "import torch, transformers; print(f'era_compile env: torch {torch.__version__}, transformers {transformers.__version__}')"
