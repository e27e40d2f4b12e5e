#!/usr/bin/env python
"""Train-phase sweep without vLLM: padded vs packed micro-batches, eager vs torch.compile,
gradient checkpointing, micro-batch token budgets, LM-head chunk size; per model shape.

    python bench/bench_train.py --shapes 0.5B 3B --out train_sweep.json

Batch: 64 samples = 32 MATH prompts x 2, responses of random token ids whose lengths are
  full: all 512 tokens (random weights never emit EOS: the worst case), or
  mix:  an ASSUMED mix for an instruct model on MATH: 20% truncated at 512, the rest normal
        (mean 310, sd 110) clipped to [16, 511], so ~350 tokens on average.
Each row times the run's own update, rlvr.training.policy_update with one mini-batch (pi_old from
the update's own forward: one optimizer step on all 64 samples): fp32 master weights, bf16
autocast, AdamW. Median of --reps updates after one warm-up (which also compiles: first_s).
MFU = 6 * params * real forward tokens / update time / measured bf16 peak (padding and
recompute not counted); pad_frac = padded tokens computed / real ones - 1. Memory: torch's
max_memory_allocated and the device's used memory (sampled every 20 ms). old_s: the no-grad
compute_old_logprobs pass (4x the budget), timed on checkpointing rows only (it never
checkpoints). compile: "ref" = the autograd LM head under checkpoint (only real response tokens
reach it), "eager" = the fused eager head (_ChunkHead), "head" = compiled head, "all" = compiled
head and decoder layers.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.models import build_random_qwen, math_texts  # noqa: E402
from bench.timing import measured_bf16_peak_tflops, now  # noqa: E402
from rlvr import attention, logprobs, training  # noqa: E402
from rlvr.data import load_subset  # noqa: E402
from rlvr.logprobs import PolicyLogprobs  # noqa: E402
from rlvr.modeling import load_policy, load_tokenizer  # noqa: E402
from rlvr.objectives import compute_advantages  # noqa: E402
from rlvr.optimizers import make_optimizer  # noqa: E402
from rlvr.prompts import encode_prompt  # noqa: E402
from rlvr.training import (  # noqa: E402
    UpdateBatch,
    UpdateSettings,
    compute_old_logprobs,
    policy_update,
)

N_PROMPTS, N_SAMPLES, MAX_TOKENS = 32, 2, 512


@dataclass(frozen=True)
class Row:
    lengths: str   # full | mix
    layout: str    # padded | packed
    compile: str   # ref | eager | head | all
    ckpt: int
    budget: int    # micro-batch tokens (padded tokens for padded, real ones for packed)
    chunk: int = logprobs.LOGIT_CHUNK_TOKENS


def default_rows(shape: str) -> list[Row]:
    """Expected ~3 min (0.5B) + ~4 min (3B) on an H100, compiling included. 3B without
    checkpointing does not fit 80 GB beyond a few thousand tokens (86 GB measured at 4.8k on an
    H200), so it gets one 4k row."""
    small = shape == "0.5B"
    rows = []
    for lengths, ckpt in itertools.product(("full", "mix"), (0, 1) if small else (1,)):
        rows.append(Row(lengths, "padded", "ref", ckpt, 16384))  # before this change
    for lengths, comp in itertools.product(("full", "mix"), ("eager", "all")):
        if not small and lengths == "full" and comp == "eager":
            continue  # 3B time budget: ref and all bracket it
        # all-512 responses leave little padding: one budget shows it
        budgets = (8192, 16384, 32768) if lengths == "mix" else (16384,)
        for ckpt in ((0, 1) if small else (1,)):
            rows.append(Row(lengths, "padded", comp, ckpt, 16384))
            rows += [Row(lengths, "packed", comp, ckpt, b) for b in budgets]
        if not small and lengths == "mix":
            rows.append(Row(lengths, "packed", comp, 0, 4096))
    ckpt = 0 if small else 1
    rows.append(Row("mix", "packed", "head", ckpt, 16384))
    chunks = (1024, 4096, 8192) if small else (4096,)
    rows += [Row("mix", "packed", c, ckpt, 16384, n) for c in ("eager", "all") for n in chunks
             if small or c == "all"]
    return rows


def grid_rows(args) -> list[Row]:
    return [Row(*r) for r in itertools.product(args.lengths, args.layouts, args.compile,
                                               args.ckpt, args.budgets, args.chunks)]


class UsedMemory:
    """Peak of the device's used memory (all processes, the CUDA context included)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.every_s)

    def reset(self) -> None:
        self.peak = 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def response_lengths(kind: str, n: int, g: torch.Generator) -> list[int]:
    if kind == "full":
        return [MAX_TOKENS] * n
    body = (torch.randn(n, generator=g) * 110 + 310).clamp(16, MAX_TOKENS - 1).long()
    truncated = torch.rand(n, generator=g) < 0.2
    return torch.where(truncated, MAX_TOKENS, body).tolist()


def make_batch(prompts: list[list[int]], kind: str) -> UpdateBatch:
    g = torch.Generator().manual_seed(0)
    lens = response_lengths(kind, len(prompts), g)
    responses = [torch.randint(0, 30000, (n,), generator=g).tolist() for n in lens]
    correct = torch.tensor([float(i % 3 == 0) for i in range(len(prompts))])
    adv, keep = compute_advantages(correct, "W_REINFORCE", 0.1, N_SAMPLES)
    return UpdateBatch(prompts, responses, adv, keep)


def computed_tokens(batch: UpdateBatch, row: Row) -> int:
    """Tokens the forward actually processes: padded rows pay for their padding."""
    idx = list(range(len(batch.responses)))
    if row.layout == "packed":
        return sum(batch.seq_len(i) for i in idx)
    return sum(len(mb) * max(batch.seq_len(i) for i in mb)
               for mb in training.micro_batches(idx, [batch.seq_len(i) for i in idx],
                                                row.budget))


def configure(policy, row: Row) -> None:
    if row.ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_disable()
    logprobs.use_logit_head({"ref": "autograd", "eager": "fused"}.get(row.compile, "compiled"))
    attention.compile_decoder_layers(policy, row.compile == "all")
    logprobs.LOGIT_CHUNK_TOKENS = row.chunk


def settings(batch: UpdateBatch, row: Row, pad_id: int, device) -> UpdateSettings:
    return UpdateSettings(temperature=1.0, clip_range=0.2, mini_batch_size=len(batch.responses),
                          max_grad_norm=1.0, pad_id=pad_id, device=device,
                          micro_batch_tokens=row.budget, packed=row.layout == "packed")


def one_update(policy, opt, batch: UpdateBatch, row: Row, pad_id: int, device,
               gen: torch.Generator) -> None:
    """The run's own update (pi_old from its own forward: one optimizer step on all samples)."""
    policy_update(PolicyLogprobs(policy), opt, batch, settings(batch, row, pad_id, device), gen)


def time_row(policy, opt, batch: UpdateBatch, row: Row, reps: int, pad_id: int,
             device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    times, old_s = [], None
    for _ in range(reps + 1):
        t0 = now()
        one_update(policy, opt, batch, row, pad_id, device, gen)
        times.append(now() - t0)
    if row.ckpt:
        for _ in range(2):
            t0 = now()
            compute_old_logprobs(PolicyLogprobs(policy), batch,
                                 settings(batch, row, pad_id, device))
            old_s = now() - t0
    return {"first_s": times[0], "update_s": statistics.median(times[1:]), "old_s": old_s}


def profile_row(policy, opt, batch: UpdateBatch, row: Row, pad_id: int, device) -> None:
    """One update under torch.profiler after the timed ones: where the GPU's time goes (top
    kernels by device time) and how much of the wall time the GPU is busy at all."""
    from torch.profiler import ProfilerActivity, profile

    t0 = now()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_update(policy, opt, batch, row, pad_id, device, torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
    wall = now() - t0
    events = prof.key_averages()
    kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    print(f"profile {row}: wall {wall:.3f} s (profiler on), GPU kernels {busy:.3f} s "
          f"({busy / wall:.0%} busy)")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / 1e3:8.1f} ms {e.count:6d}x  {e.key[:90]}")
    cpu = sorted((e for e in events if e.device_type.name == "CPU"),
                 key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top CPU ops (self): " + ", ".join(
        f"{e.key[:40]} {e.self_cpu_time_total / 1e3:.0f} ms" for e in cpu), flush=True)
    syncs = [e for e in events if "Synchronize" in e.key and e.device_type.name == "CPU"]
    print("  host waits on the GPU: " + (", ".join(
        f"{e.key} {e.count}x {e.self_cpu_time_total / 1e3:.0f} ms" for e in syncs) or "none"),
        flush=True)


def run_shape(shape: str, args, peak: float, used: UsedMemory, out: dict, save) -> None:
    rows_in = load_subset(args.data_dir, "train")[:N_PROMPTS]  # fails fast without the data
    model_dir = build_random_qwen(shape, Path(args.model_root) / shape, math_texts(args.data_dir))
    tok = load_tokenizer(str(model_dir))
    prompts = [p for r in rows_in for p in [encode_prompt(tok, r["problem"])] * N_SAMPLES]
    policy = load_policy(str(model_dir), torch.device("cuda"), gradient_checkpointing=False)
    attn = attention.enable_packed_attention(policy)
    n_params = sum(p.numel() for p in policy.parameters())
    opt = make_optimizer(policy, 1e-6, 0.01)
    batches = {k: make_batch(prompts, k) for k in ("full", "mix")}
    rows = grid_rows(args) if args.grid else default_rows(shape)
    out.update(shape=shape, params=n_params, packed_attention=attn, rows=[])
    print(f"\n{shape}: {n_params / 1e6:.0f} M params, packed attention {attn}", flush=True)
    print(HEADER, flush=True)
    # compiled rows last: eager rows then need no un-compiling, and compile runs once
    for row in sorted(rows, key=lambda r: ("ref", "eager", "head", "all").index(r.compile)):
        batch = batches[row.lengths]
        real = sum(batch.seq_len(i) for i in range(len(batch.responses)))
        r = {**asdict(row), "fwd_tokens": real,
             "pad_frac": computed_tokens(batch, row) / real - 1}
        configure(policy, row)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        used.reset()
        try:
            r.update(time_row(policy, opt, batch, row, args.reps, tok.pad_token_id,
                              torch.device("cuda")))
            r.update(tok_s=real / r["update_s"],
                     mfu=6 * n_params * real / r["update_s"] / (peak * 1e12))
        except torch.OutOfMemoryError:
            r["oom"] = True
        except Exception as e:  # e.g. a compile failure: record it, measure the other rows
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        opt.zero_grad(set_to_none=True)
        r.update(alloc_gib=torch.cuda.max_memory_allocated() / 2**30, used_gib=used.peak / 2**30)
        out["rows"].append(r)
        print(fmt(shape, r), flush=True)
        if args.profile and not (r.get("oom") or r.get("error")):
            profile_row(policy, opt, batch, row, tok.pad_token_id, torch.device("cuda"))
            opt.zero_grad(set_to_none=True)
        save()  # after every row: a time-out keeps what was measured
    del policy, opt
    gc.collect()
    torch.cuda.empty_cache()


HEADER = (f"{'shape':<5} {'len':<4} {'layout':<6} {'compile':<7} {'ckpt':>4} {'budget':>6} "
          f"{'chunk':>5} {'pad%':>5} {'update_s':>8} {'first_s':>7} {'tok/s':>7} {'MFU':>6} "
          f"{'old_s':>6} {'alloc':>6} {'used':>6}")


def fmt(shape: str, r: dict) -> str:
    head = (f"{shape:<5} {r['lengths']:<4} {r['layout']:<6} {r['compile']:<7} {r['ckpt']:>4} "
            f"{r['budget']:>6} {r['chunk']:>5} {r['pad_frac']:>5.0%} ")
    mem = f"{r['alloc_gib']:>6.1f} {r['used_gib']:>6.1f}"
    if r.get("oom") or r.get("error"):
        return head + ("OOM" if r.get("oom") else f"error {r['error'][:60]}") + " " + mem
    old = f"{r['old_s']:>6.3f}" if r["old_s"] is not None else f"{'-':>6}"
    return head + (f"{r['update_s']:>8.3f} {r['first_s']:>7.1f} {r['tok_s']:>7.0f} "
                   f"{r['mfu']:>6.1%} {old} ") + mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["0.5B", "3B"], choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default=os.environ.get("RLVR_MODEL_ROOT", "/tmp/rlvr_models"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--grid", action="store_true",
                    help="the full product of the lists below instead of the default rows")
    ap.add_argument("--lengths", nargs="+", default=["full", "mix"])
    ap.add_argument("--layouts", nargs="+", default=["padded", "packed"])
    ap.add_argument("--compile", nargs="+", default=["eager", "all"],
                    choices=("ref", "eager", "head", "all"))
    ap.add_argument("--ckpt", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--budgets", nargs="+", type=int, default=[8192, 16384, 32768])
    ap.add_argument("--chunks", nargs="+", type=int, default=[logprobs.LOGIT_CHUNK_TOKENS])
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="after each row, profile one more update: top kernels, GPU busy share")
    args = ap.parse_args()

    peak = measured_bf16_peak_tflops()
    used = UsedMemory()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "peak_bf16_tflops": peak,
               "shapes": []}
    print(f"{results['device']}, torch {torch.__version__}, bf16 peak {peak:.0f} TFLOP/s")
    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))

    try:
        for shape in args.shapes:
            results["shapes"].append({})
            run_shape(shape, args, peak, used, results["shapes"][-1], save)
    finally:
        used.stop()


if __name__ == "__main__":
    main()
