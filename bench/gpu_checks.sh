#!/usr/bin/env bash
# Several GPU checks in one call on the lent device, each under its own time limit, every log
# packed into $OUT/checks.tar.gz and one line per check printed at the end:
#
#   bash bench/gpu_checks.sh "NAME:SECONDS:COMMAND" ["NAME:SECONDS:COMMAND" ...]
#   bash bench/gpu_checks.sh "tests:300:python -m pytest -m gpu tests/test_gpu.py -q" \
#                            "dist:240:python bench/dist_check.py --steps 5 --out \$OUT/dist.json"
#
# Carries what bench/device_env.sh says (.stage/vllm_payload, .whl, data/math_subset) and sources
# it first. Every run of ours on the device passes --gpu_memory_gb 79 (an 80 GB card's share).
source bench/device_env.sh || exit 1
mkdir -p "$OUT/logs"
declare -a SUMMARY
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  start=$SECONDS
  echo "=== $name (limit ${limit}s): $cmd"
  timeout --signal=INT --kill-after=5 "$limit" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/logs/$name.log"
  SUMMARY+=("$(printf '%-14s rc=%-4s %5ss' "$name" "$rc" "$((SECONDS - start))")")
done
smi_peak | tee "$OUT/logs/smi_peak.txt"
tar -czf "$OUT/checks.tar.gz" -C "$OUT" logs smi_used_mib.txt device.txt 2>/dev/null
echo "=== summary (device: $(cat "$OUT/device.txt"))"
printf '%s\n' "${SUMMARY[@]}"
