#!/usr/bin/env bash
# Sourced at the start of every call on the lent GPU machine (which has no network):
#   source bench/device_env.sh || exit 1; python bench/whole_run.py ...
# Carry .stage/vllm_payload (bash ../shared/device/build_payload.sh), .whl (torchao, torch-optimi;
# py-spy for bench/host_profile.py --profile_dir: pip download --no-deps py-spy==0.4.1 -d .whl)
# and data/math_subset (python data_prep.py --source ../shared/data/MATH); evaluation benches
# also carry .stage/eval_data (a copy of ../shared/data/MATH500; never committed).
# Installs vLLM and the wheels under /tmp, records the device, and samples nvidia-smi's
# device-wide used memory every 0.5 s into $OUT/smi_used_mib.txt (its max is the call's peak).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source .stage/vllm_payload/install_vllm.sh || return 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_extra \
    .whl/*.whl && export PYTHONPATH=/tmp/site_extra:${PYTHONPATH:-} PATH=/tmp/site_extra/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/smi_used_mib.txt" &
SMI_PID=$!
smi_peak() { echo "nvidia-smi peak (device-wide, MiB): $(sort -n "$OUT/smi_used_mib.txt" | tail -1)"; }
trap 'kill $SMI_PID 2>/dev/null' EXIT
