#!/usr/bin/env bash
# Every benchmark that measures the embedded world model, in two lanes of one torch thread each (a 2-core
# machine), as docs/results.md's results were made: run it after the shipped weights (or the judge) change.
# About an hour on a 2-core CPU; each benchmark writes its JSON and table into benchmarks/results/, its log
# into benchmarks/results/logs/. The demo's report goes to runs/demo/.
#
#   bash benchmarks/run_world.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python -c "import cones, torch" 2>/dev/null && command -v cones > /dev/null || {
  echo "run_world.sh: cones is not installed in this Python; activate its environment (. .venv/bin/activate)."
  exit 1
}
LOGS=benchmarks/results/logs
mkdir -p "$LOGS"
step() {  # name, command...: run it, log it, say how it went and how long it took
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$LOGS/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
}
(
  step world python benchmarks/bench_world.py --quick
  step concepts python benchmarks/bench_concepts.py --steps 150 --sparsity 0.01 0.05 --seeds 2
  step precision python benchmarks/bench_precision.py --quick
  step ingredients python benchmarks/bench_ingredients.py
) &
(
  step demo cones demo --out runs/demo --overwrite
  step attention python benchmarks/bench_attention.py --quick
  step multi python benchmarks/bench_multi.py --quick
  step paper python benchmarks/bench_paper.py --fast
) &
wait
python benchmarks/make_results.py
