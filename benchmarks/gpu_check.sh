#!/usr/bin/env bash
# The GPU check (issue 11): SD 1.5-sized sampler and learner speed with random weights,
# printed as one JSON line. On one GPU: `bash benchmarks/gpu_check.sh` (about 3-6 minutes);
# on a CPU: `bash benchmarks/gpu_check.sh --cpu-smoke` (the same code path, tiny sizes).
# Runs from any directory; uses the repository's .venv when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
export DS_ACCELERATOR="${DS_ACCELERATOR:-}"
if [ "${1:-}" = "--cpu-smoke" ]; then export DS_ACCELERATOR=cpu; fi
[ -n "$DS_ACCELERATOR" ] || unset DS_ACCELERATOR
exec timeout 480 "$python" "$here/benchmarks/gpu_check.py" "$@"
