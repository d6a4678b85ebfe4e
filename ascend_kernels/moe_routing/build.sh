#!/usr/bin/env bash
# Builds the CPU MoE routing kernel (ms_llm/kernels/csrc/moe_routing.cc) into the kernel cache ahead of time;
# FusedMoERouting otherwise builds it on first construction on CPU. Prints the path of the shared library.
#   build.sh [--isa auto|avx512|avx2|generic] [--cache-root DIR] [--cxx g++]
# Uses $PYTHON (default: python); ms_llm is imported from the installed package or from this checkout.
# Nothing to build for Ascend: the fused path there is MindSpore's built-in ops.moe_init_routing_v2 (see README.md).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -c 'import sys; from ms_llm.kernels._build import main; sys.exit(main(sys.argv[1:]))' \
    moe_routing.cc "$@"
