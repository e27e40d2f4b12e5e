"""Rollout engines: one small interface (rlvr.rollout.RolloutEngine), an HF `generate` engine
(CPU, tests) and vLLM (GPU, rlvr/vllm_engine.py), and `make_engine`, the one place that picks and
builds either.

Both sample with exactly the requested temperature, top-p 1, top-k off and no repetition penalty.
A model's own generation_config (Qwen2.5-Instruct ships top_k 20, top_p 0.8 and a repetition
penalty) must never leak in, or the rollouts are not samples of the policy being trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from rlvr.logprobs import autocast_ctx
from rlvr.rollout import Completion, RolloutEngine
from rlvr.sampling import SEED_RANGE, RowSampler

# Working memory one HF `generate` call may use (KV cache, prefill activations, logits) when the
# engine runs on the CPU: with fp32 weights, AdamW state and the grader workers, a SmolLM2-135M
# run then stays within an 8 GB machine. A constant, not a share of the free memory, so that the
# chunking (and with it the padding, hence the last bits of the logits) is the same on every run.
CPU_GENERATION_BUDGET_BYTES = 1 << 30
# On a GPU, this share of the card (the HF engine only runs there when vLLM is not used).
GPU_GENERATION_BUDGET_SHARE = 1 / 8


@dataclass(frozen=True)
class GenerationCost:
    """Bytes one sequence costs inside `generate`, from the model's shapes: upper bounds of peak
    RSS on CPU (transformers 5.17, sdpa, glibc malloc), which tests/test_engines.py holds to a
    measurement of the test model (docs/PERFORMANCE.md has the calibration runs). Prefill holds
    about a second copy of the KV cache and ~(12 hidden + 6 intermediate) fp32 values per prompt
    token beyond it (activations, and what the allocator does not hand back between layers); the
    padding mask is [b, 1, L, L] fp32.
    """

    kv_per_token: int       # K and V of every layer for one position, in the cache's dtype
    prefill_per_token: int  # what one prompt token holds on top during prefill (see above)
    step_per_seq: int       # fp32 logits, processed scores and probabilities of one step
    score_per_step: int     # one step's kept [vocab] scores when log-probs are asked for
    per_chunk: int = 32 << 20  # whatever a call needs however small (workspaces, allocator)

    @classmethod
    def of(cls, model: torch.nn.Module) -> GenerationCost:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        elt = next(model.parameters()).element_size()  # the cache is kept in the weights' dtype
        kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elt
        return cls(kv_per_token=kv, prefill_per_token=kv + (12 * cfg.hidden_size + 6 * inter) * 4,
                   step_per_seq=4 * cfg.vocab_size * 4, score_per_step=cfg.vocab_size * 4)

    def per_sequence(self, prompt_len: int, max_tokens: int, scores: bool) -> int:
        """Peak bytes of one sequence padded to `prompt_len` generating `max_tokens`."""
        mask = 8 * prompt_len  # the 4D padding mask, and a copy of it
        return ((prompt_len + max_tokens) * self.kv_per_token
                + prompt_len * (self.prefill_per_token + mask) + self.step_per_seq
                + (max_tokens * self.score_per_step if scores else 0))

    def chunk_bytes(self, n: int, prompt_len: int, max_tokens: int, scores: bool) -> int:
        """Peak bytes of one generate() call of `n` sequences padded to `prompt_len`."""
        return self.per_chunk + n * self.per_sequence(prompt_len, max_tokens, scores)


def plan_chunks(lengths: list[int], max_tokens: int, scores: bool, cost: GenerationCost,
                budget_bytes: int) -> list[list[int]]:
    """Indices of `lengths` grouped into generate() calls that each fit `budget_bytes`.

    Longest prompts first, so that each chunk pads little and the most expensive chunk runs
    first (a budget that is too large fails at once, not an hour in). Stable: the copies of one
    prompt stay together and in order. A single sequence over budget still gets its own chunk.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks, start = [], 0
    while start < len(order):
        per_seq = cost.per_sequence(lengths[order[start]], max_tokens, scores)
        size = max(1, (budget_bytes - cost.per_chunk) // per_seq)
        chunks.append(order[start:start + size])
        start += size
    return chunks


def default_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory
                   * GPU_GENERATION_BUDGET_SHARE)
    return CPU_GENERATION_BUDGET_BYTES


class HFEngine:
    """Samples with the policy itself through `transformers.generate`: nothing to sync.

    A call is split into chunks whose KV cache, prefill activations and logits fit
    `memory_budget_bytes` (default: `default_budget_bytes`), so the whole eval set (1,250
    problems x 4 samples) never goes through one `generate` call.
    """

    name = "hf"

    def __init__(self, policy: torch.nn.Module, tokenizer, eos_ids: list[int], *,
                 memory_budget_bytes: int | None = None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.memory_budget_bytes = memory_budget_bytes
        self.cost = GenerationCost.of(policy)

    def _generation_config(self, max_tokens: int, greedy_scores: bool):
        from transformers import GenerationConfig

        # Every sampling knob is set explicitly: generate() fills unset (None) values first from
        # the checkpoint's generation_config and then from global defaults (top_k 50). It always
        # runs greedily: sampling happens in RowSampler, which hands generate a one-hot score.
        return GenerationConfig(
            do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
            min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, bad_words_ids=None,
            suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
            forced_eos_token_id=None, max_new_tokens=max_tokens, min_new_tokens=0,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
            output_scores=greedy_scores, return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 return_logprobs: bool = False, top_p: float = 1.0,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        model = self.policy
        device = next(model.parameters()).device
        budget = self.memory_budget_bytes or default_budget_bytes(device)
        if seeds is None:
            # callers that do not name their requests draw them from torch's global stream,
            # which the run seeds once and every checkpoint saves
            seeds = torch.randint(SEED_RANGE, (len(prompts),)).tolist()
        flat = [p for p in prompts for _ in range(n)]
        flat_seeds = [s + j for s in seeds for j in range(n)]
        chunks = plan_chunks([len(p) for p in flat], max_tokens, return_logprobs, self.cost,
                             budget)
        gen_config = self._generation_config(max_tokens, return_logprobs and temperature == 0)
        from transformers import GenerationConfig

        own_config, was_training = model.generation_config, model.training
        model.generation_config = GenerationConfig()  # nothing of the checkpoint's to fall back on
        model.eval()
        completions: list[Completion | None] = [None] * len(flat)
        try:
            for chunk in chunks:
                sampler = (None if temperature == 0 else
                           RowSampler([flat_seeds[i] for i in chunk], temperature, top_p))
                outs = self._generate_chunk([flat[i] for i in chunk], gen_config, device,
                                            sampler, return_logprobs)
                for i, c in zip(chunk, outs):
                    completions[i] = c
        finally:
            model.generation_config = own_config
            model.train(was_training)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_chunk(self, flat: list[list[int]], gen_config, device,
                        sampler: RowSampler | None, return_logprobs: bool) -> list[Completion]:
        from transformers import LogitsProcessorList

        L = max(len(p) for p in flat)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(flat), L), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(flat):  # left padding: generation appends on the right
            ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        processors = LogitsProcessorList([sampler] if sampler is not None else [])
        with autocast_ctx(device, cache=True):  # one bf16 copy per generate, not per token
            out = self.policy.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                       generation_config=gen_config, logits_processor=processors)
        new = out.sequences[:, L:]
        step_logps = None
        if return_logprobs and sampler is not None:
            step_logps = torch.stack(sampler.logprobs, 1)
        elif return_logprobs:
            # greedy: generate's `scores` are the raw logits of each step; one step at a time,
            # so that no second [b, T, vocab] copy is ever made
            step_logps = torch.stack([
                s.float().log_softmax(-1).gather(1, new[:, t:t + 1]).squeeze(1)
                for t, s in enumerate(out.scores)], 1).cpu()
            del out
        completions = []
        for i, toks in enumerate(new.tolist()):
            end = next((j + 1 for j, t in enumerate(toks) if t in self.eos_ids), None)
            kept = toks if end is None else toks[:end]
            completions.append(Completion(
                token_ids=kept,
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                truncated=end is None,
                logprobs=None if step_logps is None else step_logps[i, :len(kept)].tolist(),
            ))
        return completions

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to load: generate() samples with the policy module itself, whose weights are
        the trainer's. The iterator is left unconsumed (producing its tensors would be waste)."""

    def sleep(self) -> None:
        pass


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()



def make_engine(backend: str, model_dir: str, tokenizer, eos_ids: list[int], *,
                policy: torch.nn.Module | None = None, max_model_len: int, seed: int,
                max_num_seqs: int = 512, sleep_mode: bool = False,
                kv_cache_bytes: int | None = None, gpu_mem_util: float | None = None,
                tensor_parallel: int = 1, distributed: bool = False) -> RolloutEngine:
    """The rollout engine for `backend` ("auto": vLLM where CUDA and the vllm package are
    present, else HF). HF samples with `policy` (loaded from `model_dir` when not given: fp32 on
    CPU, bf16 autocast on a GPU). vLLM loads `model_dir` in bf16; `kv_cache_bytes` or
    `gpu_mem_util` size it (see VLLMEngine); `distributed` makes it one engine per rank of a
    torchrun job (`tensor_parallel` consecutive ranks sharing one, see VLLMEngine)."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "hf":
        if tensor_parallel != 1:
            raise ValueError("tensor-parallel rollouts need the vLLM engine")
        if policy is None:
            from rlvr.modeling import load_policy

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            policy = load_policy(model_dir, device, False)
        return HFEngine(policy, tokenizer, eos_ids)
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r}: auto, vllm or hf")
    from rlvr.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, tokenizer, eos_ids, max_model_len=max_model_len, seed=seed,
                      max_num_seqs=max_num_seqs, sleep_mode=sleep_mode,
                      kv_cache_bytes=kv_cache_bytes, gpu_mem_util=gpu_mem_util,
                      tensor_parallel=tensor_parallel, distributed=distributed)
