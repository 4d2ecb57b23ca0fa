#!/usr/bin/env bash
# One device call: a change that should not move results, checked on the GPU against the code before it.
#   1. every GPU test of the current tree (`pytest -m gpu`);
#   2. the GPU TTFT of the current tree and of a baseline tree (BASELINE, default .baseline: an older
#      checkout, e.g. `mkdir .baseline && git archive <commit> | tar -x -C .baseline`), interleaved
#      baseline/current/baseline/current in the same lease, so both see the same host.
# Carry .whl (boto3 stack + simpy, see h100_measure.sh) and the baseline folder; writes logs and raw JSON to
# $OUT.  Then here: python -m testbed.validation.ttft compare <baseline raw...> -- <current raw...>.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
BASELINE=${BASELINE:-.baseline}
CONFIGS=${CONFIGS:-4096+128,16384+1024}
SOURCES=${SOURCES:-recompute,dram_layerwise,objectcache_paced}
ROUNDS=${ROUNDS:-2}
BUDGET_S=${BUDGET_S:-540}
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q tests/testbed/engine 2>&1 | tee $OUT/gpu_tests.log
measure() {  # $1: tree, $2: module, $3: output name
  (cd "$1" && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m "$2" measure --link-gbps 100 --repeats 3 \
    --streams 8 --sources "$SOURCES" --configs "$CONFIGS" --shared-prefix --data-dir /dev/shm/oc-$3 \
    --raw "$OUT/$3.json" 2>&1 | tail -n 12 | tee -a "$OUT/measure.log"; rm -rf /dev/shm/oc-$3)
}
for r in $(seq 1 "$ROUNDS"); do
  if (( SECONDS - start > BUDGET_S - 150 )); then echo "stopping before round $r: device budget"; break; fi
  measure "$BASELINE" testbed.ttft "baseline_$r"
  if (( SECONDS - start > BUDGET_S - 75 )); then echo "stopping before current round $r: device budget"; break; fi
  measure . testbed.validation.ttft "current_$r"
done
echo "elapsed ${SECONDS}s"
