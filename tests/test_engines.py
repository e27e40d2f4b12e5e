"""The HF rollout engine: bounded memory on an eval-sized call, order and RNG kept across chunks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rlvr.engines import CPU_GENERATION_BUDGET_BYTES, GenerationCost, HFEngine, plan_chunks
from rlvr.modeling import load_policy, load_tokenizer
from rlvr.sampling import RowSampler, top_p_mask

CPU = torch.device("cpu")

# Runs in a child process, so that its peak RSS is its own: the default eval (1,250 problems x
# eval_n 4) through one `generate` call of the tiny model, then one forced single chunk whose
# measured peak is compared with the engine's estimate. Prompts of 16-128 tokens and 4-token
# responses (real ones are longer) keep it fast; one unchunked call still peaks at 2.2 GB.
CHILD = r"""
import json, re, resource, sys, torch
repo, model_dir = sys.argv[1:3]
sys.path.insert(0, repo)
torch.set_num_threads(1)  # a memory test: one thread keeps it quick on a loaded 2-core machine
from rlvr.engines import HFEngine
from rlvr.modeling import load_policy, load_tokenizer

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

def peak_bytes(fn):
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS count (VmHWM)
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base

tok = load_tokenizer(model_dir)
policy = load_policy(model_dir, torch.device("cpu"), False)
engine = HFEngine(policy, tok, [])  # no EOS: every sequence runs to max_tokens
engine.generate([[5] * 8], 1, 1.0, 2)  # warm-up: lazy initialisations are not the call's memory
# A hard cap as well, so that an unbounded engine fails at once instead of filling the machine.
cap = status("VmSize") + 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
g = torch.Generator().manual_seed(0)
# Mostly short prompts and a tenth at 128 tokens: an unchunked call pads all 5,000 to 128.
lengths = [128 if i % 10 == 0 else int(torch.randint(16, 49, (1,), generator=g))
           for i in range(1250)]
prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
result = {}
if hasattr(engine, "cost"):  # first, while freed memory cannot hide a peak
    one = prompts[:64]
    engine.memory_budget_bytes = 2**40  # one chunk, to hold the estimate against the measurement
    result["chunk_peak"] = peak_bytes(lambda: engine.generate(one, 1, 1.0, 96, True))
    result["chunk_estimate"] = engine.cost.chunk_bytes(64, max(map(len, one)), 96, True)
    engine.memory_budget_bytes = None
result["eval_peak"] = peak_bytes(lambda: engine.generate(prompts, 4, 1.0, 4))
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def child_memory(tiny_model_dir) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_default_sized_eval_generation_stays_within_the_memory_budget(child_memory):
    """1,250 x 4 sequences in one generate() call took 24 GB with this model (issue 10)."""
    assert child_memory["eval_peak"] <= CPU_GENERATION_BUDGET_BYTES, child_memory


def test_generation_cost_estimate_bounds_the_measured_peak(child_memory):
    """The chunk plan is only as good as the estimate: it must not undercount (incl. scores)."""
    assert child_memory["chunk_peak"] <= child_memory["chunk_estimate"], child_memory


def test_chunks_fit_the_budget_longest_first_and_keep_copies_together():
    cost = GenerationCost(kv_per_token=100, prefill_per_token=50, step_per_seq=1000,
                          score_per_step=100, per_chunk=5000)
    lengths = [5, 20, 20, 10, 10, 5, 500]
    budget = 30_000
    chunks = plan_chunks(lengths, 10, False, cost, budget)
    assert [i for c in chunks for i in c] == [6, 1, 2, 3, 4, 0, 5]  # longest first, stable
    assert chunks[0] == [6]  # over budget on its own: still generated, alone
    for c in chunks[1:]:
        assert cost.chunk_bytes(len(c), max(lengths[i] for i in c), 10, False) <= budget
    assert chunks[1] == [1, 2, 3]  # as many as fit (4 would not), whatever their own lengths
    assert plan_chunks(lengths, 10, True, cost, budget)[1] == [1, 2]  # kept scores cost too


@pytest.fixture(scope="module")
def policy_and_tok(tiny_model_dir):
    return (load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False),
            load_tokenizer(str(tiny_model_dir)))


def prompts_of_many_lengths() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 30, 3, 30, 12, 21)]


def test_chunked_generation_returns_each_prompt_its_own_completions(policy_and_tok):
    """Prompts are reordered by length for chunking; the output must come back in prompt order
    and equal what each prompt gets on its own (greedy, so it is comparable)."""
    policy, tok = policy_and_tok
    prompts = prompts_of_many_lengths()
    alone = [HFEngine(policy, tok, []).generate([p], 1, 0, 6)[0][0].token_ids for p in prompts]
    for budget in (1, 2**40):  # one sequence per chunk; everything in one chunk
        engine = HFEngine(policy, tok, [], memory_budget_bytes=budget)
        outs = engine.generate(prompts, 2, 0, 6)
        assert [[c.token_ids for c in group] for group in outs] == [[a, a] for a in alone]


def test_unseeded_calls_draw_their_seeds_from_the_global_rng(policy_and_tok):
    """Without named seeds, a call depends on torch's global state alone (which a run seeds once
    and every checkpoint saves), never on how it is chunked."""
    policy, tok = policy_and_tok
    prompts = prompts_of_many_lengths()[:3]

    def sample(budget) -> list[list[int]]:
        engine = HFEngine(policy, tok, [], memory_budget_bytes=budget)
        return [c.token_ids for g in engine.generate(prompts, 2, 1.0, 6) for c in g]

    torch.manual_seed(0)
    first, second = sample(1), sample(1)
    torch.manual_seed(0)
    assert sample(2**40) == first
    assert second != first


def test_seeded_samples_depend_on_their_seed_alone(policy_and_tok):
    """A prompt's samples are the same alone, among other prompts, in other chunks, and whatever
    the global RNG holds: what makes resumed evals, data-parallel ranks and concurrent evals
    equal to one uninterrupted process. Sample j uses seed + j, so samples of one prompt differ."""
    policy, tok = policy_and_tok
    prompts = prompts_of_many_lengths()
    seeds = [11, 22, 33, 44, 55, 66]
    together = HFEngine(policy, tok, [], memory_budget_bytes=2**40).generate(
        prompts, 2, 1.0, 6, seeds=seeds)
    torch.manual_seed(123)
    apart = [HFEngine(policy, tok, [], memory_budget_bytes=1).generate([p], 2, 1.0, 6,
                                                                          seeds=[s])[0]
             for p, s in zip(prompts, seeds)]
    assert [[c.token_ids for c in g] for g in together] == [[c.token_ids for c in g]
                                                             for g in apart]
    assert all(g[0].token_ids != g[1].token_ids for g in together)
    other = HFEngine(policy, tok, []).generate(prompts[:1], 2, 1.0, 6, seeds=[12])
    assert other[0][0].token_ids != together[0][0].token_ids


def test_row_sampler_draws_by_inverse_cdf_from_the_processed_distribution():
    """Temperature, then the nucleus, then the row's own uniform draw through the CDF."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    masked = top_p_mask(logits, 0.8)  # 0.5 + 0.3 reach 0.8: the rest is cut
    assert torch.isinf(masked[0, 2:]).all() and torch.equal(masked[0, :2], logits[0, :2])
    assert torch.equal(top_p_mask(logits, 0.5)[0, 1:].isinf(), torch.tensor([True] * 3))
    assert torch.equal(top_p_mask(logits, 1.0), logits)
    u = torch.rand((), generator=torch.Generator().manual_seed(5)).item()
    sampler = RowSampler([5], temperature=1.0, top_p=0.8)
    out = sampler(None, logits.clone())
    # renormalised nucleus: token 0 with 0.625, token 1 with 0.375
    want = 0 if u < 0.625 else 1
    assert out[0].argmax().item() == want and torch.isinf(out[0]).sum() == 3
    torch.testing.assert_close(sampler.logprobs[0], torch.log(torch.tensor([[0.625, 0.375][want]])))
    # temperature 0.5 squares the odds: 0.5^2 : 0.3^2 : 0.15^2 : 0.05^2
    hot = RowSampler([5], temperature=0.5)
    hot(None, logits.clone())
    p = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    p = p / p.sum()
    token = int((p.cumsum(0) <= u).sum())
    torch.testing.assert_close(hot.logprobs[0].exp(), p[[token]])


def test_triton_cache_dir_is_pinned_to_tritons_default_and_a_users_choice_is_kept(tmp_path,
                                                                                 monkeypatch):
    """vLLM's sampling kernels must find the last start's compiles wherever the model compile
    went: without a fixed TRITON_CACHE_DIR the start after a new model compile recompiled them."""
    # what importing the engine module and starting it set is undone after the test (some later
    # tests pass os.environ to subprocesses): setenv records the value to restore, delenv clears
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_FLASHINFER_SAMPLER",
                 "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    # the engine pins it before vLLM is constructed (a stand-in vllm module records the moment)
    seen = {}

    def llm(**kwargs):
        seen["dir"] = os.environ.get("TRITON_CACHE_DIR")
        raise RuntimeError("stop here")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=llm))
    from rlvr.vllm_engine import VLLMEngine, pin_triton_cache_dir

    with pytest.raises(RuntimeError, match="stop here"):
        VLLMEngine("model", None, [0], max_model_len=8, seed=0)
    assert seen["dir"] == str(tmp_path / ".triton" / "cache")

    env = {"TRITON_HOME": str(tmp_path)}
    assert pin_triton_cache_dir(env) == str(tmp_path / ".triton" / "cache")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / ".triton" / "cache")
    env = {}
    assert pin_triton_cache_dir(env) == str(Path.home() / ".triton" / "cache")
    env = {"TRITON_CACHE_DIR": "/users/own", "TRITON_HOME": str(tmp_path)}
    assert pin_triton_cache_dir(env) == "/users/own" and env["TRITON_CACHE_DIR"] == "/users/own"
