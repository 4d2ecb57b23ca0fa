#!/usr/bin/env bash
# One device call: GPU tests, HF equivalence, the profiler grid and the TTFT measurements (issue 5).
# Run from the repo root on the GPU machine with .whl carried; writes logs and results under $OUT.
# .whl/ (git-ignored) holds what the GPU machine lacks (it has torch, aiohttp, numpy; not boto3), made with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0
#   (add py-spy==0.4.3 to profile with `py-spy record --gil --subprocesses`).
# The GPU validation grid (issue 6; then `python -m testbed.validation.ttft validate` here):
#   STAGES=ttft REPEATS=3 SHARED_PREFIX=1 DATA_DIR=/dev/shm/oc-ttft \
#   SOURCES=recompute,dram,dram_layerwise,objectcache_paced \
#   CONFIGS=2048+128,2048+1024,2048+4096,4096+128,...,61440+4096 bash testbed/scripts/h100_measure.sh
# The H200 fidelity grid (issue 13): the same with SOURCES=dram,dram_layerwise,objectcache_paced and, in the
# same lease, STAGES=profile,ttft PROFILE_GRID=<the configs' prefill points, see docs/harness.md>
# PROFILE_CSV=llama-3.1-8b_h200_validation_grid.csv.
# Write-back into the server (issue 13): STAGES=writeback WB_CHUNKS=256 bash testbed/scripts/h100_measure.sh
# Per-phase timelines of one 4K and one 60K request (issue 13; draw here with
# `python -m testbed.validation.timeline plot timeline.json --out timeline.png`):
#   STAGES=timeline bash testbed/scripts/h100_measure.sh
set -o pipefail
export PYTHONUNBUFFERED=1
[ -d /tmp/site/boto3 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
STAGES=${STAGES:-tests,hf,check,profile,ttft}
if [[ $STAGES == *tests* ]]; then
  timeout 180 python3 -m pytest -m gpu -p no:cacheprovider -q tests/testbed/engine/test_model.py tests/testbed/engine/test_prefill.py tests/testbed/engine/test_kvsource.py 2>&1 | tee $OUT/gpu_tests.log
fi
if [[ $STAGES == *hf* ]]; then
  timeout 120 python3 -c "
import json, torch
from tests.testbed.engine.test_model import hf_equivalence
import transformers
r = {str(dt): hf_equivalence(dt) for dt in (torch.float32, torch.bfloat16)}
r['transformers'] = transformers.__version__; r['torch'] = torch.__version__
print(json.dumps(r, indent=1)); open('$OUT/hf_equivalence.json', 'w').write(json.dumps(r, indent=1))
" 2>&1 | tee $OUT/hf.log
fi
if [[ $STAGES == *check* ]]; then
  timeout 150 python3 -m testbed.validation.ttft check --out $OUT/check.json 2>&1 | tee $OUT/check.log
fi
if [[ $STAGES == *profile* ]]; then
  timeout ${PROFILE_TIMEOUT:-240} python3 -m testbed.engine.profile --model llama-3.1-8b --repeats ${PROFILE_REPEATS:-3} \
    ${PROFILE_GRID:+--warmup 2 --grid $PROFILE_GRID} --out $OUT/${PROFILE_CSV:-llama-3.1-8b_h100_measured.csv} \
    --json $OUT/profile.json 2>&1 | tee $OUT/profile.log
fi
if [[ $STAGES == *ttft* ]]; then
  timeout ${TTFT_TIMEOUT:-300} python3 -m testbed.validation.ttft measure --link-gbps ${LINK_GBPS:-100} --repeats ${REPEATS:-5} \
    --streams ${STREAMS:-8} --reader ${READER:-process} --piece-kib ${PIECE_KIB:-64} ${SOURCES:+--sources $SOURCES} \
    ${CONFIGS:+--configs $CONFIGS} ${SHARED_PREFIX:+--shared-prefix} ${DATA_DIR:+--data-dir $DATA_DIR} \
    --raw $OUT/ttft_raw.json 2>&1 | tee $OUT/ttft.log
fi
if [[ $STAGES == *timeline* ]]; then
  timeout ${TIMELINE_TIMEOUT:-400} python3 -m testbed.validation.timeline measure \
    --configs ${TIMELINE_CONFIGS:-4096+128,61440+128} --link-gbps ${LINK_GBPS:-100} --streams ${STREAMS:-8} \
    --reader ${READER:-process} --piece-kib ${PIECE_KIB:-64} --warmups ${WARMUPS:-3} ${DATA_DIR:+--data-dir $DATA_DIR} \
    --out $OUT/timeline.json 2>&1 | tee $OUT/timeline.log
fi
if [[ $STAGES == *writeback* ]]; then
  timeout ${WRITEBACK_TIMEOUT:-120} python3 -m testbed.bench.writeback --chunks ${WB_CHUNKS:-256} --repeat ${WB_REPEAT:-1} \
    --fsync ${WB_FSYNC:-off} --paths ${WB_PATHS:-after} --streams ${WB_STREAMS:-8} --out $OUT/writeback.json 2>&1 | tee $OUT/writeback.log
fi
