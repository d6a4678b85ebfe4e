#!/usr/bin/env bash
# Set up .venv if needed and run the test suite (CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${MS_LLM_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"   # msrun starts workers with the first python on PATH
echo "[test] $VENV/bin/python -m pytest -q $*"
set +e
GLOG_v=${GLOG_v:-3} "$VENV/bin/python" -m pytest -q -rs --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] pytest collected no tests"; exit 1; fi
exit "$rc"
