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
from rlvr.run_plan import choose_plan, eval_engine_options, memory_fraction

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
    # two engines, each evaluating half the problems at 512 sequences: 512 x 662 tokens each
    two = Workload(eval_seqs=5000, eval_max_tokens=512, eval_engine_seqs=512, eval_engines=2)
    assert eval_engine_kv_tokens(two) == 338_944
    each = (weights + 338_944 * 24 * 2 * 2 * 64 * 2 + 512 * 151_936 * 4) / GIB + 1.5 + 0.6
    assert engine_processes_gib(SHAPE, two) == pytest.approx(2 * each + 0.5)
    # a share smaller than the concurrency caps it: 10 problems x 4 samples over 2 engines
    small = Workload(eval_seqs=40, eval_max_tokens=512, eval_engine_seqs=512, eval_engines=2)
    assert eval_engine_kv_tokens(small) == 20 * 662 + 8  # 13,240 tokens in 16-token blocks
    # one-step-off: the rollout engine's own CUDA context, and the buffer
    assert engine_processes_gib(SHAPE, Workload(async_rollout=True)) == pytest.approx(1.1)


def test_with_an_eval_engine_the_rollout_engines_kv_is_sized_for_the_rollouts_alone():
    rollouts = 64 * (1024 + 512)  # 64 sequences of the longest prompt and response
    assert kv_tokens_wanted(Workload(eval_engine_seqs=1024)) == rollouts
    assert kv_tokens_wanted(Workload()) == 512 * (150 + 512)  # the eval at 512 sequences


def test_eval_engine_options_prefer_engines_then_concurrency_and_keep_a_floor(tmp_path):
    def options(**kw):
        return eval_engine_options(resolve({"data_dir": str(tmp_path), **kw}))

    assert options() == [(2, 512), (2, 256), (2, 128), (1, 1024), (1, 512), (1, 256)]
    assert options(eval_engines=3, eval_max_num_seqs=768) == [
        (3, 256), (3, 128), (2, 384), (2, 192), (1, 768), (1, 384)]
    assert options(eval_engines=4, eval_max_num_seqs=100) == [(1, 100)]  # one engine always


@pytest.mark.parametrize("budget, engines, seqs", [(79, 2, 512), (30, 2, 256), (26.3, 2, 128),
                                                   (24, 1, 256), (20, 1, None)])
def test_auto_takes_eval_engines_only_where_the_updates_keep_their_settings(budget, engines,
                                                                            seqs, tmp_path):
    cfg = resolve({"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "gpu_memory_gb": budget,
                   "data_dir": str(tmp_path)})
    plan, _ = choose_plan(cfg, 1250)
    alone, _ = choose_plan(resolve({**cfg.to_json(), "concurrent_eval": "false"}), 1250)
    assert (plan.eval_engines, plan.eval_engine_seqs) == (engines, seqs)
    assert (plan.sleep, plan.micro_batch_tokens) == (alone.sleep, alone.micro_batch_tokens)
    if seqs:
        assert plan.rollout_gib["engine_processes"] > 0 and plan.eval_kv_cache_bytes > 0


def test_asked_for_an_eval_engine_is_planned_or_refused_and_the_cap_leaves_it_room(tmp_path):
    base = {"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "data_dir": str(tmp_path)}
    plan, _ = choose_plan(resolve({**base, "gpu_memory_gb": 20, "concurrent_eval": "true"}),
                          1250)
    assert plan.eval_engine_seqs in (128, 256, 512, 1024)
    async_plan, _ = choose_plan(resolve({**base, "gpu_memory_gb": 79, "async_rollout": True}),
                                1250)
    assert (async_plan.eval_engines, async_plan.eval_engine_seqs) == (2, 512)
    assert not async_plan.sleep
    # the trainer's own cap leaves the card's share of the engine processes to them (and adds
    # back vLLM's sleeping pool, which torch still counts)
    r = plan.rollout_gib
    asleep = r["vllm_weights"] + r["kv_cache"] if plan.sleep else 0.0
    assert memory_fraction(plan, 80) == pytest.approx(
        (plan.budget_gib + asleep - r["engine_processes"]) / 80)
    assert memory_fraction(async_plan, 80, async_rollout=True) == pytest.approx(
        (79 - async_plan.rollout_gib["engine_processes"] - async_plan.rollout_gib["vllm_weights"]
         - async_plan.rollout_gib["kv_cache"] - async_plan.rollout_gib["vllm_overhead"]) / 80)


def test_each_eval_engine_gets_its_share_of_the_graders_and_the_plans_sizes(monkeypatch,
                                                                            tmp_path):
    import rlvr.engine_process as engine_process
    from rlvr.run_plan import Resolved
    from rlvr.run_setup import start_eval_engines

    class Recorder:  # stands in for the process start; only the specs are looked at
        def __init__(self, spec):
            self.spec = spec

    monkeypatch.setattr(engine_process, "EngineProcess", Recorder)
    mem = Resolved("adamw", False, 8192, eval_engine_seqs=512, eval_kv_cache_bytes=7 << 30,
                   eval_engines=2)
    cfg = resolve({"data_dir": str(tmp_path), "grader_workers": 5})
    specs = [p.spec for p in start_eval_engines(cfg, mem, "m")]
    assert [(s.grader, s.grader_workers, s.max_num_seqs, s.kv_cache_bytes) for s in specs] == [
        (True, 2, 512, 7 << 30)] * 2
    assert start_eval_engines(cfg, Resolved("adamw", False, 8192), "m") == []  # none planned
