#!/usr/bin/env bash
# `make demo`: the main job on the embedded digits data, end to end (about a minute on 2 CPU cores):
# train scratch and label-KD ResNets (3 seeds each), compare accuracy and diversity with
# intervals and tests, draw their loss surfaces, and write an offline HTML report.
set -euo pipefail
OUT=${1:-demo-out}
KD=${KD:-.venv/bin/kdprobe}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread per process is fastest

"$KD" study demo --out "$OUT" --quiet
echo
echo "== the same diversity table straight from the checkpoints (kdprobe diversity) =="
"$KD" diversity "$OUT/cells/*/*.pt" --batch-size 32 --runs 5 \
    --csv "$OUT/diversity-cli.csv" --json "$OUT/diversity-cli.json" --html "$OUT/diversity-cli.html"
echo
echo "outputs in $OUT/:"
echo "  report.html            open in a browser (offline): accuracy, diversity, loss surfaces"
echo "  summary.json cells.csv every number, machine-readable"
echo "  cells/<method>/*.pt    the checkpoints (kdprobe info / eval / landscape accept them)"
echo "  landscapes/*/*.vtk|h5  loss surfaces for ParaView / h5py"
