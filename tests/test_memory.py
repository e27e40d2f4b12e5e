"""The memory plan (rlvr/memory.py, memory_search.py, memory_notes.py, memory_plan.py):
hand-computed sizes, the calibration against the GPU measurements of docs/PERFORMANCE.md,
choices, refusals. Pure arithmetic, fast.

`pytest tests/test_memory.py -s` also prints the plan tables for 0.5B/1.5B/3B/7B x 80/24 GiB.
"""

from __future__ import annotations

import json
import re

import pytest

from rlvr.memory import (
    GIB,
    KNOWN_SHAPES,
    ModelShape,
    PlanError,
    Workload,
    default_optim_specs,
    kv_tokens_wanted,
    model_shape_from_config,
    param_bytes,
    policy_gib,
    train_tensors_gib,
)
from rlvr.memory_plan import plan_memory
from rlvr.optimizers import OPTIMIZERS

SPECS = OPTIMIZERS  # the optimizers' own byte counts (measured in tests/test_optimizers.py)


def shape(name: str) -> ModelShape:
    return model_shape_from_config(KNOWN_SHAPES[name])


S05 = shape("Qwen/Qwen2.5-0.5B-Instruct")
S15 = shape("Qwen/Qwen2.5-1.5B-Instruct")
S3 = shape("Qwen/Qwen2.5-3B-Instruct")
S7 = shape("Qwen/Qwen2.5-Math-7B")
WL = Workload()
WL7 = Workload(max_tokens=1024, eval_max_tokens=1024)  # the 7B shape's 1,024-token responses


def plan(s: ModelShape, budget: float, wl: Workload = WL, **kw):
    return plan_memory(s, wl, budget, optim_specs=SPECS, **kw)


# --- shapes --------------------------------------------------------------------------------------

def test_parameter_counts_match_the_released_models():
    assert S05.n_params == 494_032_768
    assert S15.n_params == 1_543_714_304
    assert S3.n_params == 3_085_938_688
    # Qwen2.5-Math-7B (and 7B-Instruct, same shape): untied 152,064 x 3,584 embeddings and head
    assert S7.n_params == 7_615_616_512
    assert shape("Qwen/Qwen2.5-7B-Instruct").n_params == S7.n_params


def test_kv_bytes_per_token():
    assert S05.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2 == 12_288
    assert S7.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57_344


def test_shape_from_llama_style_and_nested_configs():
    llama = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "vocab_size": 100, "model_type": "llama"}
    s = model_shape_from_config(llama)
    assert (s.kv_heads, s.head_dim, s.qkv_bias, s.tied_embeddings) == (4, 16, False, False)
    # embed + head + 2 x (4 square projections + MLP + 2 norms) + final norm
    assert s.n_params == 2 * 6400 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 128) + 64
    assert model_shape_from_config({"text_config": llama}) == s


def test_missing_config_key_is_one_line():
    cfg = dict(KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"])
    del cfg["intermediate_size"]
    with pytest.raises(PlanError, match="intermediate_size") as e:
        model_shape_from_config(cfg)
    assert "\n" not in str(e.value)


# --- components ----------------------------------------------------------------------------------

def test_kv_cache_of_the_default_workload():
    # rollouts 64 x (1024 + 512) = 98,304; eval min(512, 5000) x (150 + 512) = 338,944
    assert kv_tokens_wanted(WL) == 338_944
    # with 64 concurrent sequences the eval needs 42,368 tokens and the rollouts win
    assert kv_tokens_wanted(Workload(max_num_seqs=64)) == 98_304
    # block granularity: 7 x 667 = 4,669 -> 4,672 (one 1,536-token sequence is less)
    assert kv_tokens_wanted(Workload(rollout_seqs=1, eval_seqs=7, max_num_seqs=7,
                                     typical_prompt_tokens=155)) == 4_672


@pytest.mark.parametrize("name,weights,grads,state,autocast", [
    ("adamw", 4, 4, 8, True), ("adamw_kahan", 2, 2, 6, False),
    ("adamw_8bit", 4, 4, 2 * (1 + 4 / 256), True), ("adamw_offload", 4, 4, 0, True)])
def test_policy_bytes_per_optimizer(name, weights, grads, state, autocast):
    got = policy_gib(S05, SPECS[name], checkpointing=False)
    p = S05.n_params
    assert got["weights"] == pytest.approx(p * weights / GIB)
    assert got["grads"] == pytest.approx(p * grads / GIB)
    assert got["optimizer"] == pytest.approx(p * state / GIB)
    # bf16 copies of the projections and the (tied) head: all but norms and q/k/v biases
    assert got["autocast"] == pytest.approx(493_961_216 * 2 / GIB if autocast else 0)


def test_with_checkpointing_one_layer_and_the_head_are_cast_at_once():
    # a 0.5B layer: 896 x (2 x 896 + 2 x 128) + 3 x 896 x 4,864 = 14,909,440 matmul weights;
    # the tied head 151,936 x 896 = 136,134,656; x 24 layers + head = all 493,961,216
    assert S05.layer_matmul_params == 14_909_440
    assert S05.layers * 14_909_440 + 136_134_656 == S05.matmul_params
    got = policy_gib(S05, SPECS["adamw"], checkpointing=True)
    assert got["autocast"] == pytest.approx((14_909_440 + 136_134_656) * 2 / GIB)
    assert policy_gib(S05, SPECS["adamw_kahan"], checkpointing=True)["autocast"] == 0


def test_param_bytes_follow_the_dtype_the_optimizer_keeps():
    assert param_bytes(SPECS["adamw_kahan"]) == 2 and param_bytes(SPECS["adamw"]) == 4


def test_the_plan_reads_the_optimizers_own_specs_and_the_loss_chunk_size():
    from rlvr.logprobs import LOGIT_CHUNK_TOKENS

    assert default_optim_specs() is OPTIMIZERS
    assert Workload().logit_chunk_tokens == LOGIT_CHUNK_TOKENS


# --- calibration: bench_train.py, fp32 AdamW, 64 samples, no vLLM ------------------------------
# torch.cuda.max_memory_allocated excludes the CUDA context and fragmentation, so the measured peak
# is compared with the tensors alone. H200 (autocast weight cache on, 2,048-token logit chunks):
# micro-batches of N samples padded to ~605 tokens each, without checkpointing (where the cache
# made no difference: autograd keeps the bf16 copies either way).
TOKENS_PER_SAMPLE = 605
MEASURED = [  # shape, micro-batch tokens, checkpointing, logit chunk, peak GiB
    (S05, 16 * 605, False, 2048, 30.3), (S05, 32 * 605, False, 2048, 47.3),
    (S05, 64 * 605, False, 2048, 79.3), (S3, 8 * 605, False, 2048, 85.6),
    (S3, 16 * 605, False, 2048, 114.1),
    # H100, 2026-11-22, packed 512-token responses, autocast weight cache off (this version)
    (S05, 8192, True, 1024, 10.57), (S05, 8192, False, 1024, 23.10),
    (S3, 8192, True, 1024, 52.8), (S3, 4096, True, 1024, 51.7),
]


@pytest.mark.parametrize("s,mb,ckpt,chunk,measured", MEASURED)
def test_model_reproduces_the_measurements_within_15_percent(s, mb, ckpt, chunk, measured):
    got = train_tensors_gib(s, SPECS["adamw"], gradient_checkpointing=ckpt,
                            micro_batch_tokens=mb, logit_chunk_tokens=chunk)
    assert got == pytest.approx(measured, rel=0.15)


# --- hand-worked plans ---------------------------------------------------------------------------

# 0.5B, default workload, exact AdamW (GiB): weights/grads 494,032,768 x 4; state x 8; autocast
# (one layer's 14,909,440 + the head's 136,134,656 matmul weights) x 2;
# activations (24 x 4 x 896 + 30 x 896 + 10 x 4,864) x 8,192 tokens;
# logits 3 x 1,024 x 151,936 x 4; vLLM 2 B/param + 338,944 x 12,288 KV + (1.5 GiB + 512 x 151,936
# x 4 B); context 0.6; fragmentation 15% of grads + autocast + activations + logits; vLLM's
# start-up activations 16,384 x 11 x (896 + 4,864) B = 0.97 GiB come before the optimizer state
# (3.68 GiB) is allocated, so they add nothing to the rollout column.
HAND_05 = {"weights": 1.84040, "grads": 1.84040, "optimizer": 3.68080, "autocast": 0.28134,
           "activations": 1.23242, "logits": 1.73877, "reference": 0.0, "vllm_weights": 0.92020,
           "kv_cache": 3.87891, "vllm_overhead": 1.78979, "vllm_startup": 0.0, "context": 0.6,
           "fragmentation": 0.76394}


@pytest.mark.parametrize("budget", [80, 24])
def test_hand_worked_plan_05b(budget):
    p = plan(S05, budget)
    # no-checkpoint activations of 8,192 tokens are 13.8 GiB > 10% of either budget; below 1B
    # parameters vLLM stays awake
    assert (p.optim, p.gradient_checkpointing, p.sleep, p.micro_batch_tokens) == (
        "adamw", True, False, 8192)
    assert p.kv_cache_tokens == 338_944 and p.kv_cache_bytes == 338_944 * 12_288
    assert p.train_gib == pytest.approx(HAND_05, abs=1e-4)
    rollout = {k: HAND_05[k] for k in ("weights", "optimizer", "vllm_weights", "kv_cache",
                                       "vllm_overhead", "context")}
    assert {k: v for k, v in p.rollout_gib.items() if v} == pytest.approx(rollout, abs=1e-4)
    assert p.rollout_peak_gib == pytest.approx(12.710, abs=1e-3)
    assert p.train_peak_gib == pytest.approx(18.567, abs=1e-3)
    assert p.planned_peak_gib == p.train_peak_gib
    assert p.headroom_gib == pytest.approx(budget - 18.567, abs=1e-3)
    assert p.optim_exact and p.cpu_gib == 0 and p.gpu_mem_util is None


def test_tight_budget_takes_sleep_then_smaller_micro_batches_then_leaner_optimizer():
    p = plan(S15, 24)
    # exact AdamW cannot fit (its leanest plan needs 32.1 GiB); Kahan AdamW with vLLM asleep and
    # 8,192-token micro-batches trains in budget; the KV cache is cut for the rollout phase
    assert (p.optim, p.sleep, p.gradient_checkpointing, p.micro_batch_tokens) == (
        "adamw_kahan", True, True, 8192)
    assert p.train_gib["vllm_weights"] == p.train_gib["kv_cache"] == 0
    assert p.kv_cache_tokens < kv_tokens_wanted(WL)
    assert p.planned_peak_gib <= 24 * 0.97  # every plan keeps 3% free
    assert any("adamw needs >= 30.9 GiB" in n for n in p.notes)


def test_3b_on_80_sleeps_with_exact_updates():
    p = plan(S3, 80)
    assert (p.optim, p.sleep, p.gradient_checkpointing) == ("adamw", True, True)
    assert p.planned_peak_gib <= 80


def test_7b_fits_80_gib_only_with_a_lean_optimizer():
    """bf16 weights and grads on the GPU, Kahan AdamW stepped in host memory: the in-GPU lean
    options leave no room for vLLM's start-up (measured: the 7B shape with adamw_kahan planned at
    0.0 GiB headroom ran out of memory while vLLM allocated its KV cache). Exact AdamW with its
    state offloaded fits the GPU but needs 16 B/param (113.5 GiB) of host RAM: not on a 125 GiB
    host (75% of it may hold optimizer state)."""
    p = plan(S7, 80, WL7, host_gib=125)
    assert p.optim == "adamw_kahan_offload" and p.sleep and p.gradient_checkpointing
    assert p.planned_peak_gib <= 80 * 0.97
    assert p.cpu_gib == pytest.approx(S7.n_params * 10 / GIB)
    assert any("adamw_kahan needs" in n and "adamw_offload needs 113.5 GiB of host memory" in n
               for n in p.notes)
    # with host memory to spare the exact offloaded optimizer comes first
    assert plan(S7, 80, WL7, host_gib=160).optim == "adamw_offload"


def test_a_refusal_names_the_host_ram_an_offloading_optimizer_would_need():
    with pytest.raises(PlanError) as e:
        plan(S7, 80, WL7, host_gib=24)
    # Kahan state offloaded: 7,615,616,512 params x 10 B = 70.9 GiB, three quarters of >= 95 GiB
    assert str(e.value).endswith("--optim adamw_kahan_offload would fit with >= 95 GiB of host RAM "
                                 "(--host_memory_gb, now 24 GiB)")


def test_an_offloaded_optimizer_the_host_cannot_hold_is_refused_in_one_line():
    with pytest.raises(PlanError, match=r"^--optim adamw_offload keeps 113\.5 GiB of optimizer "
                                        r"state in host memory, more than 75% of the host's 64\.0"):
        plan(S7, 80, WL7, optim="adamw_offload", host_gib=64)


# --- refusals ------------------------------------------------------------------------------------

def needed(message: str) -> float:
    return float(re.search(r"needs >= ([\d.]+) GiB", message).group(1))


def test_forced_exact_optimizer_on_7b_names_the_budget_and_a_fitting_option():
    with pytest.raises(PlanError) as e:
        plan(S7, 80, WL7, optim="adamw", host_gib=125)
    msg = str(e.value)
    assert "\n" not in msg and "with --optim adamw," in msg
    assert "it fits 80.0 GiB with --optim adamw_kahan_offload" in msg
    # the budget named is enough for the forced option, and 0.2 GiB less is not
    assert plan(S7, needed(msg), WL7, optim="adamw").optim == "adamw"
    with pytest.raises(PlanError):
        plan(S7, needed(msg) - 0.2, WL7, optim="adamw")


def test_3b_on_8_gib_is_refused_with_the_budget_it_needs():
    with pytest.raises(PlanError) as e:
        plan(S3, 8)
    msg = str(e.value)
    assert "\n" not in msg and "budget is 8.0 GiB" in msg and "larger GPU" in msg
    assert plan(S3, needed(msg)).planned_peak_gib <= needed(msg)


def test_forced_options_that_block_the_fit_are_named():
    with pytest.raises(PlanError) as e:
        plan(S3, 80, gradient_checkpointing="false", sleep="false", micro_batch_tokens=16384)
    msg = str(e.value)
    assert ("with --gradient_checkpointing false, --vllm_sleep false, --micro_batch_tokens 16384,"
            in msg)
    # 94 GiB of activations: checkpointing is what blocks it, the other two can stay
    assert "it fits 80.0 GiB with --gradient_checkpointing true" in msg


def test_shorter_responses_are_offered_when_no_option_helps():
    # 0.5B with 2,048-token responses on 7.5 GiB: even its leanest plan needs 7.7 GiB
    with pytest.raises(PlanError, match=r"needs >= 7.7 GiB.*fits 7.5 GiB with --max_tokens 1024$"):
        plan(S05, 7.5, Workload(max_tokens=2048, eval_max_tokens=2048))


def test_bad_inputs_are_plan_errors():
    for kw in ({"optim": "sgd"}, {"gpu_mem_util": 1.5}, {"micro_batch_tokens": 0},
               {"sleep": "maybe"}):
        with pytest.raises(PlanError):
            plan(S05, 80, **kw)
    with pytest.raises(PlanError, match="budget"):
        plan(S05, 0)
    with pytest.raises(PlanError, match="max_tokens"):
        plan(S05, 80, Workload(max_tokens=0))
    with pytest.raises(PlanError, match="gpu_mem_util"):
        plan(S7, 80, WL7, gpu_mem_util=0.1)  # 8 GiB < 14.2 GiB of vLLM weights


# --- choices respected ---------------------------------------------------------------------------

def test_forced_choices_are_kept():
    p = plan(S05, 80, gradient_checkpointing=False, sleep=True, micro_batch_tokens=4096)
    assert (p.gradient_checkpointing, p.sleep, p.micro_batch_tokens) == (False, True, 4096)
    assert all("as given" in n for n in p.notes[1:4])
    p = plan(S05, 80, optim="adamw_8bit", gradient_checkpointing="true")
    assert (p.optim, p.gradient_checkpointing) == ("adamw_8bit", True)
    p = plan(S3, 80, sleep="false")  # awake: the train phase gets smaller micro-batches instead
    assert not p.sleep and p.micro_batch_tokens < 16384 and p.planned_peak_gib <= 80


def test_no_checkpointing_when_activations_are_a_small_share():
    # 2,048 tokens of 0.5B activations without checkpointing: 3.5 GiB <= 10% of 80 GiB
    p = plan(S05, 80, micro_batch_tokens=2048)
    assert not p.gradient_checkpointing
    assert p.train_gib["activations"] == pytest.approx(24 * 75_520 * 2048 / GIB)


def test_micro_batch_never_below_one_longest_sequence():
    p = plan(S7, 80, WL7)
    assert p.micro_batch_tokens >= WL7.max_prompt_tokens + WL7.max_tokens


def test_gpu_mem_util_override():
    p = plan(S05, 80, gpu_mem_util=0.35)
    assert p.kv_cache_bytes is None and p.kv_cache_tokens is None and p.gpu_mem_util == 0.35
    assert p.vllm_share_gib == pytest.approx(28.0)
    assert p.rollout_gib["kv_cache"] == pytest.approx(28.0 - 0.92020 - 1.78979, abs=1e-4)
    assert p.vllm_memory_utilization(79.19) == pytest.approx(28.0 / 79.19)
    assert "--gpu_mem_util 0.35" in p.notes[-1]


def test_reference_model_is_held_in_both_phases():
    p = plan(S05, 80, Workload(reference_model=True))
    assert p.rollout_gib["reference"] == p.train_gib["reference"] == pytest.approx(0.92020,
                                                                                  abs=1e-4)


def test_offload_keeps_the_state_on_the_cpu():
    p = plan(S3, 80, optim="adamw_offload")
    # host copies of the fp32 weights and grads, and the fp32 moments: 16 B/param
    assert p.rollout_gib["optimizer"] == 0 and p.cpu_gib == pytest.approx(3.0859e9 * 16 / GIB,
                                                                          rel=1e-3)
    assert "host memory" in p.format_table()


def test_plans_are_deterministic():
    a, b = plan(S15, 24), plan(S15, 24)
    assert a == b and a.to_dict() == b.to_dict()


# --- output --------------------------------------------------------------------------------------

CASES = [("0.5B", S05, WL), ("1.5B", S15, WL), ("3B", S3, WL), ("7B (Math-7B shape)", S7, WL7)]


@pytest.mark.parametrize("budget", [80, 24])
@pytest.mark.parametrize("label,s,wl", CASES, ids=[c[0] for c in CASES])
def test_print_plan_tables(label, s, wl, budget):
    try:
        p = plan(s, budget, wl)
    except PlanError as e:
        print(f"\n== {label} on {budget} GiB: PlanError: {e}")
        return
    table = p.format_table()
    print(f"\n== {label} on {budget} GiB\n{table}\n" + "\n".join(f"   - {n}" for n in p.notes))
    lines = table.splitlines()
    assert len(lines) <= 16 and max(map(len, lines)) <= 100
    json.dumps(p.to_dict())
    assert p.to_dict()["kv_cache_bytes"] == p.kv_cache_bytes


def test_the_enforced_cap_adds_back_what_sleeping_vllm_still_counts_as_allocated():
    from rlvr.run_plan import memory_fraction

    p = plan(S3, 24, host_gib=125)
    assert p.sleep and p.optim == "adamw_kahan_offload"
    # torch keeps counting vLLM's bf16 weights (3,085,938,688 x 2 B) and its KV cache while
    # their pages are released: the cap is the budget plus both, as a share of an 80 GiB card
    asleep = 3_085_938_688 * 2 / GIB + p.kv_cache_bytes / GIB
    assert memory_fraction(p, 80.0) == pytest.approx((24 + asleep) / 80)
    awake = plan(S05, 24)
    assert not awake.sleep and memory_fraction(awake, 80.0) == pytest.approx(24 / 80)


def test_sleep_mode_rollout_allowance_is_not_vllms_share_and_not_stacked_on_start_up():
    p = plan(S3, 24, host_gib=125)
    r = p.rollout_gib
    # measured: evals in sleep mode ran 1.2 GiB above the model; it is the allocator's, not vLLM's
    assert r["fragmentation"] == pytest.approx(1.2)
    assert p.vllm_share_gib == pytest.approx(r["vllm_weights"] + r["kv_cache"] + r["vllm_overhead"])
    # start-up (2.19 GiB of activations, no optimizer state on the GPU, before any sleep/wake)
    # adds only what exceeds the 1.2 GiB the steady phase already counts
    assert r["vllm_startup"] == pytest.approx(16_384 * 11 * (2048 + 11008) / GIB - 1.2)
    awake = plan(S05, 80)
    assert awake.rollout_gib["fragmentation"] == 0


def test_host_ram_is_the_containers_limit_where_that_is_lower(tmp_path):
    from rlvr.run_plan import host_ram_gib

    machine = host_ram_gib(limit_files=())
    limit, unlimited = tmp_path / "memory.max", tmp_path / "unlimited"
    limit.write_text(f"{3 * 2**30}\n")
    unlimited.write_text("max\n")
    assert host_ram_gib(limit_files=(str(limit),)) == pytest.approx(3.0)
    assert host_ram_gib(limit_files=(str(unlimited), str(tmp_path / "absent"))) == machine
