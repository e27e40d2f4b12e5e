"""The memory plan of the engine processes (a concurrent eval engine, one-step-off rollouts),
hand-computed for the Qwen2.5-0.5B shape, and when `--concurrent_eval auto` takes one."""

from __future__ import annotations

import pytest

from rlvr.config import resolve
from rlvr.memory import (
    GIB,
    KNOWN_SHAPES,
    Workload,
    engine_processes_gib,
    eval_engine_kv_tokens,
    kv_tokens_wanted,
    model_shape_from_config,
)
from rlvr.run_plan import choose_plan, memory_fraction

SHAPE = model_shape_from_config(KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"])


def test_an_eval_engine_costs_its_weights_kv_overhead_and_context():
    wl = Workload(eval_seqs=5000, eval_max_tokens=512, eval_engine_seqs=1024)
    # 1,024 sequences of 150 prompt + 512 new tokens, in 16-token blocks: 677,888 tokens
    assert eval_engine_kv_tokens(wl) == 677_888
    weights = 494_032_768 * 2                   # bf16
    kv = 677_888 * 24 * 2 * 2 * 64 * 2          # layers x (K, V) x KV heads x head dim x bf16
    sampler = 1024 * 151_936 * 4                # fp32 logits of every decoding sequence
    want = (weights + kv + sampler) / GIB + 1.5 + 0.6 + 0.5  # overhead, context, buffer
    assert engine_processes_gib(SHAPE, wl) == pytest.approx(want)
    assert engine_processes_gib(SHAPE, Workload()) == 0.0
    # one-step-off: the rollout engine's own CUDA context, and the buffer
    assert engine_processes_gib(SHAPE, Workload(async_rollout=True)) == pytest.approx(1.1)


def test_with_an_eval_engine_the_rollout_engines_kv_is_sized_for_the_rollouts_alone():
    rollouts = 64 * (1024 + 512)  # 64 sequences of the longest prompt and response
    assert kv_tokens_wanted(Workload(eval_engine_seqs=1024)) == rollouts
    assert kv_tokens_wanted(Workload()) == 512 * (150 + 512)  # the eval at 512 sequences


@pytest.mark.parametrize("budget, seqs", [(79, 1024), (26.3, 512), (20, None)])
def test_auto_takes_an_eval_engine_only_where_the_updates_keep_their_settings(budget, seqs,
                                                                              tmp_path):
    cfg = resolve({"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "gpu_memory_gb": budget,
                   "data_dir": str(tmp_path)})
    plan, _ = choose_plan(cfg, 1250)
    alone, _ = choose_plan(resolve({**cfg.to_json(), "concurrent_eval": "false"}), 1250)
    assert plan.eval_engine_seqs == seqs
    assert (plan.sleep, plan.micro_batch_tokens) == (alone.sleep, alone.micro_batch_tokens)
    if seqs:
        assert plan.rollout_gib["engine_processes"] > 0 and plan.eval_kv_cache_bytes > 0


def test_asked_for_an_eval_engine_is_planned_or_refused_and_the_cap_leaves_it_room(tmp_path):
    base = {"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "data_dir": str(tmp_path)}
    plan, _ = choose_plan(resolve({**base, "gpu_memory_gb": 20, "concurrent_eval": "true"}),
                          1250)
    assert plan.eval_engine_seqs in (256, 512, 1024)
    async_plan, _ = choose_plan(resolve({**base, "gpu_memory_gb": 79, "async_rollout": True}),
                                1250)
    assert async_plan.eval_engine_seqs == 1024 and not async_plan.sleep
    # the trainer's own cap leaves the card's share of the engine processes to them (and adds
    # back vLLM's sleeping pool, which torch still counts)
    r = plan.rollout_gib
    asleep = r["vllm_weights"] + r["kv_cache"] if plan.sleep else 0.0
    assert memory_fraction(plan, 80) == pytest.approx(
        (plan.budget_gib + asleep - r["engine_processes"]) / 80)
    assert memory_fraction(async_plan, 80, async_rollout=True) == pytest.approx(
        (79 - async_plan.rollout_gib["engine_processes"] - async_plan.rollout_gib["vllm_weights"]
         - async_plan.rollout_gib["kv_cache"] - async_plan.rollout_gib["vllm_overhead"]) / 80)
