#!/usr/bin/env bash
# One command for a GPU machine: the Triton kernels against the reference, bench_logprobs, bench_generate
# and one T-SPMO step against minirl.plan, in at most 8 minutes, into one JSON report (tools/gpu_check.py
# says what each part checks). Exit status 0 only if every part ran and passed.
#
#   bash tools/gpu_check.sh [--out gpu_check.json]        # on a machine with CUDA
#   bash tools/gpu_check.sh --cpu-smoke --out /tmp/s.json # tiny shapes on the CPU: tests the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
# gpu_check.py keeps its own deadline (470 s) and writes the report in every case; this is the backstop.
exec timeout --kill-after=10 490 python3 tools/gpu_check.py "$@"
