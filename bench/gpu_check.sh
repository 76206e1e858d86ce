#!/usr/bin/env bash
# One short GPU check (< 8 minutes, installs nothing): ResNet-56 training images/s (batch 64
# and 512; GPU-resident tensors vs torch DataLoader; eager vs torch.compile), loss-landscape
# grid points/s and the diversity score's seconds per checkpoint, on the GPU it finds.
# Without a GPU it says so, runs a tiny CPU smoke pass and exits 0.
#   usage: bench/gpu_check.sh [--data imagefolder:PATH] [--seconds 6] [--no-compile]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The python that runs is the one named here; it may carry another torch than the project's .venv
# (the script prints the versions it ran with, and installs nothing).
"$PY" -c 'import sys, torch; print("gpu_check: python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' || exit 1
# hard cap below 8 minutes; the script itself needs about 3-6 (compilation included). SIGINT first
# (the script then writes what it has), SIGKILL 15 s later if it does not stop (-k): every finished
# row is already in the JSON file, which is rewritten after each one.
timeout -k 15 -s INT 470 "$PY" bench/gpu_check.py "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then
    echo "gpu_check: stopped at the 470 s cap (rows so far are in the JSON); rerun with --no-compile or --seconds 3" >&2
fi
exit $rc
