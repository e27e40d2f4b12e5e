"""The pure pieces of data parallel, hand-computed: the split of a step's prompts and of an eval
set, every rank's micro-batches (padded to a common count), the global mini-batch schedule,
tensor-parallel pooling, the launch checks, and one rank's memory plan (DDP, FSDP2, TP)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from rlvr import dist
from rlvr.config import resolve
from rlvr.memory import (
    GIB,
    KNOWN_SHAPES,
    ModelShape,
    Workload,
    fsdp_gathered_bytes,
    fsdp_reduce_bytes,
    kv_bytes_per_rank_token,
    model_shape_from_config,
    policy_gib,
    reference_gib,
    vllm_weights_gib,
)
from rlvr.memory_plan import plan_memory
from rlvr.optimizers import OPTIMIZERS
from rlvr.run_plan import workload
from rlvr.training import GlobalBatch, UpdateSettings, rank_micro_batches


def test_shard_gives_contiguous_parts_whose_sizes_differ_by_at_most_one():
    items = list(range(10))
    assert [dist.shard(items, 4, i) for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [dist.shard(items[:2], 3, i) for i in range(3)] == [[0], [1], []]
    assert dist.shard(items) == items  # one process: everything


def test_every_rank_runs_as_many_micro_batches_as_the_busiest():
    # global sequence lengths, rank 0 holds samples 0-3, rank 1 samples 4-7; 20 padded tokens:
    # rank 0 -> [10, 9] (2 x 10) and [8, 3] (2 x 8); rank 1 -> all four (4 x 2)
    seq = [10, 9, 8, 3, 2, 2, 2, 2]
    every = range(8)
    assert rank_micro_batches(every, seq, 2, 0, 20) == [[0, 1], [2, 3]]
    assert rank_micro_batches(every, seq, 2, 1, 20) == [[0, 1, 2, 3], []]
    # one mini-batch's samples (global 0, 1, 2 and 5): rank 0 local 0-2, rank 1 local 1
    assert rank_micro_batches([0, 1, 2, 5], seq, 2, 0, 20) == [[0, 1], [2]]
    assert rank_micro_batches([0, 1, 2, 5], seq, 2, 1, 20) == [[1], []]
    # a rank with none of a mini-batch's samples still runs the others' count, empty
    assert rank_micro_batches([0, 2, 3], seq, 2, 0, 20) == [[0, 2], [3]]
    assert rank_micro_batches([0, 2, 3], seq, 2, 1, 20) == [[], []]
    assert rank_micro_batches([0, 2], seq, 1, 0, None) == [[0, 2]]  # alone: no padding


def test_the_schedule_is_global_whatever_each_rank_keeps():
    # PSR kept 3 samples on rank 0 and 1 on rank 1. One mini-batch of 8: the kept 4 with 17
    # tokens, a token mean x 4/8 (divided by 17 x 8/4 = 34); of 2: ceil(4 / 2) = 2 optimizer
    # steps over the global batch, each full (its own token count)
    keep = [True, False, True, True, False, False, True, False]
    lens = [4, 5, 3, 4, 2, 2, 6, 2]
    s = UpdateSettings(temperature=1.0, clip_range=0.2, mini_batch_size=8, max_grad_norm=1.0,
                       pad_id=0, device=torch.device("cpu"))
    plans = [GlobalBatch(keep, lens, [10 + n for n in lens], 2, r) for r in (0, 1)]
    one = [m for p in plans for m in p.schedule(s, torch.Generator().manual_seed(0))]
    assert [(m.indices, m.normalizer) for m in one] == [([0, 2, 3, 6], 34.0)] * 2
    s = dataclasses.replace(s, mini_batch_size=2)
    a, b = (p.schedule(s, torch.Generator().manual_seed(0)) for p in plans)
    assert a == b and len(a) == 2
    assert sorted(i for m in a for i in m.indices) == [0, 2, 3, 6]
    for m in a:  # each full: its token count x 2 / 2
        assert m.normalizer == sum(lens[i] for i in m.indices)


def test_tensor_parallel_ranks_pool_their_prompts_unless_they_asked_alike():
    parts = [([[1], [2]], [10, 11]), ([[3]], [12])]
    assert dist.pool(parts, 0) == ([[1], [2], [3]], [10, 11, 12], 0)
    assert dist.pool(parts, 1) == ([[1], [2], [3]], [10, 11, 12], 2)
    assert dist.pool([([[1]], None), ([[2]], [5])], 1) == ([[1], [2]], None, 1)
    shared = ([[7], [8]], [1, 2])
    assert dist.pool([shared, shared], 1) == ([[7], [8]], [1, 2], 0)


def problem(world: int, local: int, torchrun: bool = True, cuda: bool = True, **flags):
    cfg = resolve({"rollout_batch_size": 64, "rollouts_per_prompt": 2, **flags})
    return cfg.launch_problem(world, local, torchrun, cuda)


def test_launch_checks_name_what_does_not_fit_the_job():
    assert problem(1, 1, torchrun=False, cuda=False) is None
    assert problem(8, 8, rollout_tp=2) is None and problem(16, 8, rollout_tp=8) is None
    assert "do not split evenly over the job's 3 ranks" in problem(3, 3)  # 32 prompts
    assert "--rollout_tp 4 must divide the GPUs: 6 in the job" in problem(6, 6, rollout_tp=4)
    assert "6 per node" in problem(12, 6, rollout_tp=4)
    assert "--fsdp needs CUDA GPUs" in problem(2, 2, cuda=False, fsdp=True)
    assert "--rollout_tp needs CUDA GPUs" in problem(1, 1, cuda=False, rollout_tp=2)
    assert "runs under torchrun" in problem(1, 1, torchrun=False, fsdp=True)
    assert "--fsdp shards exact AdamW only" in resolve(
        {"fsdp": True, "optim": "adamw_kahan"}).validate()
    assert "--fsdp needs the vLLM engine" in resolve({"fsdp": True, "backend": "hf"}).validate()


def test_fsdp_on_this_cpu_machine_is_one_line_and_exit_2_before_anything_loads(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "MATH_experiment.py"), "--fsdp",
                           "--output_dir", str(tmp_path / "runs")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: --fsdp needs CUDA GPUs (and vLLM for the rollouts); "
                                   "this machine has none")
    assert not (tmp_path / "runs").exists()


def test_one_ranks_workload_is_its_engines_share():
    cfg = resolve({"rollout_batch_size": 64, "eval_n": 4, "rollout_tp": 2})
    wl = workload(cfg, 1250, world_size=8, fsdp=True)  # 4 engines of 2 GPUs
    assert (wl.rollout_seqs, wl.eval_seqs, wl.fsdp_shards, wl.rollout_tp) == (16, 313 * 4, 8, 2)
    alone = workload(resolve({}), 1250)
    assert (alone.rollout_seqs, alone.eval_seqs, alone.fsdp_shards) == (64, 5000, None)


TINY = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=2, head_dim=4, vocab=32,
                  tied_embeddings=True)


def test_fsdp_memory_terms_are_one_ranks_shard_plus_the_gathered_units():
    # per layer: q,k,v 8x8 + biases 24, o 8x8, MLP 3 x 8x16, two norms: 256+24+384+16 = 680
    assert TINY.n_params == 32 * 8 + 2 * 680 + 8 == 1624
    # bf16: two layers + the root (embedding 256 + final norm 8) gathered; a layer's gradients
    # in bf16 and in the reduce-scatter's fp32 buffer while the root's bf16 ones wait for the
    # end of backward (6 x 680 + 2 x 264 = 4,608 > the root's own bf16 + fp32 at the end, 1,584)
    assert fsdp_gathered_bytes(TINY) == 2 * (2 * 680 + 264)
    assert fsdp_reduce_bytes(TINY) == 4608
    wide = dataclasses.replace(TINY, vocab=4096)  # the root outweighs a layer: 6 x root at the end
    assert fsdp_reduce_bytes(wide) == 6 * (4096 * 8 + 8)
    adamw = OPTIMIZERS["adamw"]
    sharded = policy_gib(TINY, adamw, True, fsdp_shards=4)
    assert sharded["weights"] * GIB == 1624 * 4 / 4 and sharded["grads"] * GIB == 1624
    assert sharded["optimizer"] * GIB == 1624 * 8 / 4
    assert sharded["autocast"] * GIB == 2 * (2 * 680 + 264) + 4608
    # a frozen reference model is gathered like the policy but has no gradients to reduce
    ref = reference_gib(TINY, Workload(reference_model=True, fsdp_shards=4))
    assert ref * GIB == 1624 * 2 / 4 + 2 * (2 * 680 + 264)


def test_tensor_parallel_splits_vllms_weights_and_kv_heads():
    wl = Workload(rollout_tp=4)
    assert vllm_weights_gib(TINY, wl) * GIB == 1624 * 2 / 4
    assert kv_bytes_per_rank_token(TINY, wl) == TINY.kv_bytes_per_token / 2  # 2 KV heads


def test_a_7b_model_fits_an_80_gib_card_sharded_over_8_where_replicated_adamw_does_not():
    shape = model_shape_from_config(KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"])
    wl = Workload(max_tokens=1024, eval_max_tokens=1024)
    with pytest.raises(ValueError, match="needs >= "):
        plan_memory(shape, wl, 80, optim="adamw")
    # over 2 ranks it does not fit: FSDP2 runs AdamW only, so no other optimizer is suggested
    with pytest.raises(ValueError, match=r"needs >= .* use more GPUs to shard over") as e:
        plan_memory(shape, dataclasses.replace(wl, fsdp_shards=2, max_tokens=3072,
                                               eval_max_tokens=3072, rollout_seqs=8),
                    79, optim="adamw")
    assert "adamw_kahan" not in str(e.value)
    per_rank = dataclasses.replace(wl, fsdp_shards=8, rollout_seqs=8, eval_seqs=625)
    plan = plan_memory(shape, per_rank, 80, optim="adamw")
    assert plan.train_gib["weights"] == pytest.approx(shape.n_params * 4 / 8 / GIB, abs=1e-9)
    assert plan.planned_peak_gib <= 80
