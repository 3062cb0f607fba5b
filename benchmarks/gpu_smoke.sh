#!/usr/bin/env bash
# Smoke test for the first machine with GPUs (2-8): one PASS/FAIL line per check, each saying what it compared and
# what a GPU run must show; results in benchmarks/results/gpu_smoke.json. See benchmarks/gpu_smoke.py.
#   bash benchmarks/gpu_smoke.sh            # every GPU of this machine, NCCL (under 10 minutes)
#   bash benchmarks/gpu_smoke.sh --quick    # the same checks on CPU with gloo, reduced (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_smoke.py "$@"
