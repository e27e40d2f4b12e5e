#!/usr/bin/env bash
# Memory only: the three published shapes under `--gpu_memory_gb 24` (a 24 GB consumer card), run
# side by side on one 80 GB card, 30 steps each with eval every 5 (bench/whole_run.py). Each run's
# budget is enforced in its own process (torch.cuda.set_per_process_memory_fraction plus the plan's
# KV cache size) and its peak is this process's GPU memory as the driver counts it (nvidia-smi's
# per-process figure, mem/process_peak_gb in metrics.jsonl). Speeds are NOT comparable: three runs
# share one GPU and the host's cores. Usage (on the GPU machine, after bench/device_env.sh):
#   [SHAPES="1.5B 3B"] [LIMIT_S=500] bash bench/budget_24gb.sh $OUT [steps]   (LIMIT_S: wall limit per run)
# A shape may carry flags of its own after "@", comma-separated: SHAPES="0.5B@--optim=adamw_kahan,--vllm_sleep=true"
OUT=${1:-/tmp/out}; STEPS=${2:-30}
for R in ${SHAPES:-0.5B 1.5B 3B}; do
  S=${R%%@*}; FLAGS=""; [[ $R == *@* ]] && FLAGS=${R#*@} && FLAGS=${FLAGS//,/ }
  T=${R//[^A-Za-z0-9.]/_}  # one name per entry: the same shape may run with and without flags
  timeout ${LIMIT_S:-500} python bench/whole_run.py --shape $S --steps $STEPS --runs_dir /tmp/runs24_$T \
    --out "$OUT/b24_$T.json" -- --eval_limit 100 --gpu_memory_gb 24 $FLAGS > "$OUT/b24_$T.log" 2>&1 &
  sleep 20  # start-ups apart: model builds and vLLM compiles compete for the CPU
done
wait
for R in ${SHAPES:-0.5B 1.5B 3B}; do
  T=${R//[^A-Za-z0-9.]/_}
  python - "$R" /tmp/runs24_$T/*/metrics.jsonl <<'PY'
import json, sys
shape, rows = sys.argv[1], [json.loads(x) for f in sys.argv[2:] for x in open(f)]
peaks = [r[k] for r in rows for k in ("mem/process_peak_gb", "mem/eval_process_peak_gb") if k in r]
steps = [r["step"] for r in rows if "time/step_s" in r]
plan = [r["mem/planned_peak_gb"] for r in rows if "mem/planned_peak_gb" in r]
print(f"{shape} @24: {len(steps)} steps, process peak {max(peaks):.2f} GiB (per record "
      f"{min(peaks):.2f}-{max(peaks):.2f}), planned {plan[-1] if plan else '?'} GiB")
PY
  grep -m1 -A1 "^planned peak" "$OUT/b24_$T.log"; grep -m3 -i "error\|Traceback" "$OUT/b24_$T.log"
done
