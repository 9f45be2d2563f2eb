#!/usr/bin/env bash
# One command that checks every GPU claim of corda_kernels on this machine's GPU; see
# bench/gpu/check.py for the stages, options (--out, --small, --stages, --budget) and outputs.
set -uo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" bench/gpu/check.py "$@"
