#!/usr/bin/env python
"""The reference step time: TRL's GRPOTrainer with vLLM colocated, on the same work as ours.

    python bench/trl_step.py --shape 0.5B --steps 12 --out trl.json

A random-weight Qwen2.5-shaped model (bench/models.py, as bench/whole_run.py uses), 32 MATH prompts
x 2 samples x 512 tokens a step (random weights never stop early), one optimizer step per batch,
fp32 weights under bf16 autocast with exact AdamW at lr 1e-6, gradient checkpointing, no KL, our
grader as the reward. Prints the median s/step after the first two steps (TRL's own train loop:
generate, score, loss, backward, step, weight sync into vLLM). The device has no TRL: carry
trl 1.16.0, datasets 5.2.0, dill 0.4.1 and multiprocess 0.70.19 as wheels in .whl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_random_qwen, math_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    # as for our own engine: in-process vLLM, no FlashInfer sampler on the device
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr.prompts import build_messages
    from rlvr.reward import grade

    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    rows = [json.loads(x) for x in (Path(args.data_dir) / "train.jsonl").open()]
    data = Dataset.from_list([{"prompt": build_messages(r["problem"], "paper"),
                               "answer": r["answer"]} for r in rows])

    def correct(completions, answer, **_) -> list[float]:
        return [grade(c[0]["content"], a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            print(f"[trl] step {len(self.times)}: {self.times[-1]:.2f} s", flush=True)

    config = GRPOConfig(
        output_dir="/tmp/trl_bench", max_steps=args.steps, learning_rate=1e-6,
        per_device_train_batch_size=64, num_generations=2, steps_per_generation=1,
        gradient_accumulation_steps=1, max_completion_length=512, temperature=1.0, top_p=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, bf16=True, gradient_checkpointing=True,
        model_init_kwargs={"dtype": torch.float32}, use_vllm=True, vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, logging_steps=1,
        report_to=[], save_strategy="no", seed=0)
    timer = StepTimer()
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=correct, args=config,
                          train_dataset=data, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = timer.times[2:] or timer.times
    r = {"shape": args.shape, "steps": len(timer.times), "median_step_s": statistics.median(timed),
         "step_s": [round(t, 3) for t in timer.times], "train_wall_s": wall,
         "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"\nTRL GRPOTrainer + vLLM colocate, {args.shape}, 64 x 512: median "
          f"{r['median_step_s']:.2f} s/step over steps 3-{r['steps']} ({r['step_s']})")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
