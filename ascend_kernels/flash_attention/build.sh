#!/usr/bin/env bash
# Builds the CPU flash-attention kernels (ms_llm/kernels/csrc/flash_attention.cc) into the kernel cache ahead
# of time; FusedAttention otherwise builds them on first use. Prints the path of the shared library.
#   build.sh [--isa auto|avx512|avx2|generic] [--cache-root DIR] [--cxx g++]
# Uses $PYTHON (default: python); ms_llm is imported from the installed package or from this checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -c 'import sys; from ms_llm.kernels._build import main; sys.exit(main(sys.argv[1:]))' \
    flash_attention.cc "$@"
