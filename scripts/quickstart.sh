#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default: pre-train a tiny GPT on the shipped corpus (CPU).
# Extra arguments are passed to `ms-llm train` (e.g. a config path and key.sub=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${MS_LLM_VENV:-.venv}
cmd=("$VENV/bin/ms-llm" train "$@")
echo "[quickstart] ${cmd[*]}"
GLOG_v=${GLOG_v:-3} "${cmd[@]}"
