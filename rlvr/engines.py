"""Rollout engines: one small interface, an HF `generate` engine (CPU, tests) and vLLM (GPU).

Both sample with exactly the requested temperature, top-p 1, top-k off and no repetition penalty.
A model's own generation_config (Qwen2.5-Instruct ships top_k 20, top_p 0.8 and a repetition
penalty) must never leak in, or the rollouts are not samples of the policy being trained.
"""

from __future__ import annotations

import torch

from rlvr.logprobs import autocast_ctx
from rlvr.rollout import Completion


class HFEngine:
    """Samples with the policy itself through `transformers.generate`: nothing to sync."""

    name = "hf"

    def __init__(self, policy: torch.nn.Module, tokenizer, eos_ids: list[int]):
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def _generation_config(self, temperature: float, max_tokens: int, scores: bool,
                           top_p: float = 1.0):
        from transformers import GenerationConfig

        greedy = temperature == 0
        # Every sampling knob is set explicitly: generate() fills unset (None) values first from
        # the checkpoint's generation_config and then from global defaults (top_k 50).
        return GenerationConfig(
            do_sample=not greedy, temperature=1.0 if greedy else temperature, top_k=0, top_p=top_p,
            min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, bad_words_ids=None,
            suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
            forced_eos_token_id=None, max_new_tokens=max_tokens, min_new_tokens=0,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
            output_scores=scores, return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, prompts, n, temperature, max_tokens, return_logprobs=False, top_p=1.0):
        model = self.policy
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        # HF generate samples from torch's global RNG, which the run seeds once and every
        # checkpoint saves, so a resumed run continues the same random stream (reseeding per call
        # would restart it, and make seed s's call k+1 replay seed s+1's call k).
        flat = [p for p in prompts for _ in range(n)]
        L = max(len(p) for p in flat)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(flat), L), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(flat):  # left padding: generation appends on the right
            ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        from transformers import GenerationConfig

        own_config = model.generation_config
        model.generation_config = GenerationConfig()  # nothing of the checkpoint's to fall back on
        try:
            with autocast_ctx(device):
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device),
                    generation_config=self._generation_config(temperature, max_tokens,
                                                              return_logprobs, top_p),
                )
        finally:
            model.generation_config = own_config
            model.train(was_training)
        new = out.sequences[:, L:].tolist()
        step_logps = None
        if return_logprobs:
            # generate's `scores` are the processed (post-temperature) logits of each step
            step_logps = torch.stack(out.scores, 1).float().log_softmax(-1)
        completions = []
        for i, toks in enumerate(new):
            end = next((j + 1 for j, t in enumerate(toks) if t in self.eos_ids), None)
            kept = toks if end is None else toks[:end]
            lps = None
            if step_logps is not None:
                lps = step_logps[i, torch.arange(len(kept)), torch.tensor(kept)].tolist()
            completions.append(Completion(
                token_ids=kept,
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                truncated=end is None, logprobs=lps,
            ))
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def sync_weights(self, policy):
        assert policy is self.policy, "the HF engine samples from the policy object itself"

    def sleep(self):
        pass


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def make_engine(backend: str, policy, tokenizer, model_dir: str, eos_ids: list[int], cfg):
    """Build the engine the config asks for; 'auto' takes vLLM when CUDA and vLLM are present."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "hf":
        return HFEngine(policy, tokenizer, eos_ids)
    if not vllm_available():
        raise RuntimeError("--backend vllm needs a CUDA GPU and the vllm package")
    from rlvr.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_dir, tokenizer, eos_ids, seed=cfg.seed, max_num_seqs=cfg.vllm_max_num_seqs,
        max_model_len=cfg.max_prompt_tokens + max(cfg.max_tokens, cfg.eval_max_tokens or 0),
        sleep_mode=cfg.vllm_sleep, gpu_mem_util=cfg.gpu_mem_util)
