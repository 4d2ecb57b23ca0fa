#!/usr/bin/env bash
# One device call for issue 13 on the H200 (about 8 minutes): the fidelity grid of TTFTs (which holds the
# 4K/16K/60K headline configs), the per-phase timelines of one 4K and one 60K request, the write-back rate,
# the compute profile of the same grid (same lease), the GPU tests, and the pacing probe.  Each stage has
# its own timeout; everything lands in $OUT/issue13.tgz, remade after every stage (the device returns at most
# 8 files, and a call stopped at its limit keeps the stages done so far).
# Run from the repo root on the GPU machine with .whl carried (see h100_measure.sh for how to make it).
# Then, here: tar xzf issue13.tgz; python -m testbed.validation.ttft summarize / validate (docs/engine.md).
set -o pipefail
export PYTHONUNBUFFERED=1
M=$OUT/m
mkdir -p $M
GRID=2048+128,2048+1024,2048+4096,4096+128,4096+1024,4096+4096,8192+128,8192+1024,8192+4096,16384+128,16384+1024,16384+4096,32768+128,32768+1024,32768+4096,61440+128,61440+1024,61440+4096
PGRID=0:2176,0:3072,0:4224,0:5120,0:6144,0:8192,0:8320,0:9216,0:12288,0:16512,0:17408,0:20480,0:32896,0:33792,0:36864,0:61568,0:62464,0:65536,${GRID//+/:}
snapshot() { (cd $OUT && tar czf issue13.tgz.part m && mv issue13.tgz.part issue13.tgz); }
STEPS=${STEPS:-tests,ttft,timeline,writeback,profile,probe}  # a shorter call: e.g. STEPS=tests,ttft CONFIGS=...
run_stage() {  # STAGES=... for h100_measure.sh, with the rest of the environment given
  [[ ,$STEPS, == *,${1#STAGES=},* ]] || return 0
  env OUT=$M "$@" bash testbed/scripts/h100_measure.sh >> $M/measure.log 2>&1
  snapshot
}
finish() { tail -c 4000 $M/measure.log; snapshot; rm -rf $M; ls -la $OUT; }
trap finish EXIT
date -u +%FT%TZ > $M/started.txt
run_stage STAGES=ttft REPEATS=${REPEATS:-3} SHARED_PREFIX=1 DATA_DIR=/dev/shm/oc-ttft TTFT_TIMEOUT=${TTFT_TIMEOUT:-210} \
  SOURCES=dram,dram_layerwise,objectcache_paced CONFIGS=${CONFIGS:-$GRID}
run_stage STAGES=timeline DATA_DIR=/dev/shm/oc-ttft TIMELINE_TIMEOUT=${TIMELINE_TIMEOUT:-100}
run_stage STAGES=writeback WRITEBACK_TIMEOUT=${WRITEBACK_TIMEOUT:-60}
run_stage STAGES=profile PROFILE_REPEATS=3 PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-90} PROFILE_GRID=$PGRID \
  PROFILE_CSV=llama-3.1-8b_h200_validation_grid.csv
run_stage STAGES=tests  # after the measurements: each TTFT run checks its logits against recompute anyway
[[ ,$STEPS, == *,probe,* ]] && timeout 40 python3 -m testbed.bench.first_layer --chunks 16 --streams 8 --repeat 3 --gbps 100 \
  --compute-per-layer-ms 0.5 --out $M/first_layer_16.json >> $M/measure.log 2>&1
date -u +%FT%TZ > $M/finished.txt
