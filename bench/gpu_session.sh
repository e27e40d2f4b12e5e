#!/usr/bin/env bash
# One device call: install the carried packages, run the GPU tests and the benchmarks of one shape.
#   bash bench/gpu_session.sh SHAPE [STEPS] [extra MATH_experiment.py flags...]
# Expects the vLLM payload (.stage/vllm_payload), wheels (.whl) and the MATH subset
# (data/math_subset) carried along; writes logs and JSON to $OUT.
set -uo pipefail
SHAPE=${1:-0.5B}; STEPS=${2:-12}; shift 2 || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RLVR_MODEL_ROOT=/tmp/rlvr_models TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra .whl/*.whl \
  && export PYTHONPATH=/tmp/site_extra:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ "${RUN_GPU_TESTS:-1}" = 1 ]; then
  RLVR_GPU_REPORT=$OUT/gpu_tests.json timeout 240 python3 -m pytest -m gpu tests/test_gpu.py -q -s \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^(INFO|WARNING|DEBUG)" | tail -40
fi
if [ "${RUN_BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_gpu.py --shape "$SHAPE" ${BENCH_FLAGS:-} --out "$OUT/bench_$SHAPE.json" \
    2>&1 | tee "$OUT/bench_$SHAPE.log" | grep -vE "^(INFO|WARNING|DEBUG)" | tail -25
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_mem_$SHAPE.txt" &
SMI=$!
if [ "${RUN_WHOLE:-1}" = 1 ]; then
  timeout ${WHOLE_TIMEOUT:-330} python3 bench/whole_run.py --shape "$SHAPE" --steps "$STEPS" --out "$OUT/whole_$SHAPE.json" \
    -- "$@" 2>&1 | tee "$OUT/whole_$SHAPE.log" | grep -vE "^(INFO|WARNING|DEBUG)|^\(EngineCore" | tail -30
fi
kill $SMI 2>/dev/null
echo "peak GPU memory used during this session (nvidia-smi, MiB): $(sort -n "$OUT/gpu_mem_$SHAPE.txt" | tail -1)"
