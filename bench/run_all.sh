#!/usr/bin/env bash
# Run every CPU benchmark one after another on a quiet machine; outputs go to bench/out/*.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/out
{ echo "date: $(date -u +%F' '%T) UTC"; echo "cpu: $(lscpu | sed -n 's/^Model name:\s*//p'), $(nproc) cores"; } > bench/out/machine.txt
run() { local name=$1; shift; echo "== $name: $*"; "$PY" "$@" > "bench/out/$name.txt" 2>&1; echo "   exit $? ($(tail -n 1 bench/out/$name.txt))"; }
run train     bench/bench_train.py --images 512 --rounds 3 --json bench/out/train.json
run pruning   bench/bench_pruning.py --rounds 5
run diversity bench/bench_diversity.py --repeats 3
run landscape bench/bench_landscape.py --rounds 3
run augment   bench/bench_augment.py --batches 5
run sharpness bench/bench_sharpness.py --both --json bench/out/sharpness.json
run trackers  bench/bench_trackers.py --epochs 10 --rounds 3
