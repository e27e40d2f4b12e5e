"""GPU checks of the vLLM path (run on the device; skipped on CPU).

One sleep-mode engine serves the whole module (vLLM allows one per process). A random-weight model
of the Qwen2.5-0.5B shape stands in for the real one: these checks are about numerics and plumbing,
so the weights need not be trained. Measured differences go to $RLVR_GPU_REPORT (JSON) if set.
"""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_common import report_fixture  # noqa: E402

from rlvr.fsdp import full_tensors  # noqa: E402
from rlvr.logprobs import autocast_ctx, collate, token_logprobs  # noqa: E402
from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer  # noqa: E402
from rlvr.prompts import encode_prompt  # noqa: E402
from rlvr.vllm_engine import VLLMEngine, _load_weights_on_worker  # noqa: E402

CUDA = torch.device("cuda")
REPORT: dict[str, float] = {}
TEMP = 0.7  # not 1, so a raw-vs-processed log-prob mix-up would show


write_report = report_fixture(REPORT, "RLVR_GPU_REPORT", "GPU report")


@pytest.fixture(scope="module")
def setup(random_qwen_05b):
    model_dir, texts = random_qwen_05b
    tok = load_tokenizer(str(model_dir))
    policy = load_policy(str(model_dir), CUDA, gradient_checkpointing=False)
    # the KV cache sized in bytes, as the memory plan does (256 MiB: ~21k tokens of this shape)
    engine = VLLMEngine(str(model_dir), tok, eos_token_ids(policy, tok), max_model_len=576,
                        seed=0, sleep_mode=True, kv_cache_bytes=256 * 2**20)
    prompts = [encode_prompt(tok, t[:300]) for t in texts[:4]]
    return policy, tok, engine, prompts


BASE: dict[str, torch.Tensor] = {}


def perturb(policy, scale: float, seed: int) -> None:
    """Set the layer weights to the initial ones plus fresh noise (not cumulative, so the logit
    scale, and with it the bf16 noise floor, stays the same from test to test)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "layers" in name and p.dim() == 2:
                base = BASE.setdefault(name, p.detach().clone())
                noise = torch.randn(p.shape, generator=g, device="cuda")
                p.copy_(base + noise * scale * base.std())


def logprob_diff(policy, engine, prompts, temperature=TEMP) -> tuple[float, float]:
    """Sample with vLLM (post-temperature log-probs) and recompute them with the HF policy."""
    outs = engine.generate(prompts, n=2, temperature=temperature, max_tokens=64,
                           return_logprobs=True)
    comps = [c for g in outs for c in g]
    flat_prompts = [p for p in prompts for _ in range(2)]
    b = collate(flat_prompts, [c.token_ids for c in comps], 0, CUDA)
    with torch.no_grad(), autocast_ctx(CUDA):
        logp, _ = token_logprobs(policy, b, temperature)
    diffs = torch.cat([(logp[i, :len(c.token_ids)].float().cpu() - torch.tensor(c.logprobs)).abs()
                       for i, c in enumerate(comps)])
    return diffs.max().item(), diffs.mean().item()


def test_a_sync_makes_vllm_logprobs_match_the_policy(setup):
    policy, _, engine, prompts = setup
    perturb(policy, 0.5, seed=1)
    stale_max, stale_mean = logprob_diff(policy, engine, prompts)
    engine.load_weights(full_tensors(policy))
    REPORT["sync_s"] = engine.last_sync_s
    fresh_max, fresh_mean = logprob_diff(policy, engine, prompts)
    REPORT.update(before_sync_max=stale_max, before_sync_mean=stale_mean,
                  after_sync_max=fresh_max, after_sync_mean=fresh_mean)
    assert stale_mean > 5 * fresh_mean
    assert fresh_mean < 0.03 and fresh_max < 0.5  # bf16 noise, scaled by 1/T


def test_perturbing_and_syncing_changes_greedy_output(setup):
    policy, _, engine, prompts = setup
    before = [g[0].token_ids for g in engine.generate(prompts, 1, 0.0, 32)]
    perturb(policy, 1.0, seed=2)
    engine.load_weights(full_tensors(policy))
    after = [g[0].token_ids for g in engine.generate(prompts, 1, 0.0, 32)]
    assert before != after


def test_the_prefix_cache_is_reset_after_a_sync(setup):
    policy, _, engine, prompts = setup
    engine.generate(prompts, 1, 0.0, 8)  # fills the prefix cache with these prompts' KV
    perturb(policy, 0.5, seed=3)
    engine.load_weights(full_tensors(policy))  # pushes weights AND resets the cache
    _, reset_mean = logprob_diff(policy, engine, prompts)
    # the same push without the reset: vLLM reuses prompt KV computed with the old weights
    engine.generate(prompts, 1, 0.0, 8)
    perturb(policy, 0.5, seed=4)
    weights = [(n, p.detach().to(torch.bfloat16)) for n, p in policy.named_parameters()]
    engine.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
    _, stale_kv_mean = logprob_diff(policy, engine, prompts)
    engine.llm.reset_prefix_cache()
    REPORT.update(prefix_reset_mean=reset_mean, prefix_stale_kv_mean=stale_kv_mean)
    assert reset_mean < 0.03
    assert stale_kv_mean > 3 * reset_mean  # the check above has teeth


def test_after_sleep_and_wake_generation_uses_the_new_weights(setup):
    policy, _, engine, prompts = setup
    engine.load_weights(full_tensors(policy))
    engine.sleep()
    assert engine.asleep
    perturb(policy, 0.5, seed=5)
    # wake weights -> load -> wake KV cache -> reset prefix cache
    engine.load_weights(full_tensors(policy))
    assert not engine.asleep
    mx, mean = logprob_diff(policy, engine, prompts)
    REPORT.update(after_wake_max=mx, after_wake_mean=mean)
    assert mean < 0.03 and mx < 0.5


def test_generation_config_of_the_checkpoint_does_not_leak(setup):
    """The random checkpoint ships top_k 20 / top_p 0.8 / repetition penalty 1.05: vLLM must
    sample from the full temperature-scaled distribution, so the log-probs it reports agree
    with the policy's full softmax (top-k renormalisation would raise them)."""
    policy, _, engine, prompts = setup
    assert policy.generation_config.top_k == 20
    engine.load_weights(full_tensors(policy))
    _, mean = logprob_diff(policy, engine, prompts, temperature=1.0)
    REPORT["temp1_mean"] = mean
    assert mean < 0.03


def test_text_decoded_once_at_the_end_equals_vllms_own_detokenisation(setup):
    """The engine asks vLLM for token ids only (detokenize=False) and decodes them in one batch at
    the end; on the same sampled ids that must give vLLM's own incremental text. (Two separate
    generate calls do not give the same ids, even greedy: batch composition changes bf16 sums.)"""
    from vllm import SamplingParams

    policy, tok, engine, prompts = setup
    engine.load_weights(full_tensors(policy))
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=48, stop_token_ids=engine.eos_ids,
                        skip_special_tokens=True)
    raw = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    outs = [o for r in raw for o in r.outputs]
    ours = tok.batch_decode([list(o.token_ids) for o in outs], skip_special_tokens=True)
    assert ours == [o.text for o in outs]
    texts = [c.text for g in engine.generate(prompts, 2, 1.0, 48) for c in g]
    assert all(isinstance(t, str) for t in texts) and any(texts)  # detokenize=False: filled in


def test_the_kv_cache_has_the_planned_size(setup):
    _, _, engine, _ = setup
    cfg = engine.llm.llm_engine.vllm_config.cache_config
    REPORT["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    assert cfg.kv_cache_memory_bytes == 256 * 2**20
