"""Response lengths of a real model, imposed on a random-weight one (benchmarks only).

Random weights almost never sample EOS, so every response runs to --max_tokens: the worst case.
A trained 0.5B instruct model on MATH does not. With `install(engine)` each sample's length is
drawn from the stated mix instead (vLLM stops it there), so rollouts, training and evals cost what
real, uneven responses cost.

The mix (an assumption, stated once here and in docs/PERFORMANCE.md): 20% of responses reach the
limit (truncated), the rest are normal with mean 0.6 x limit and sd 0.2 x limit, clipped to
[0.08, 1) x limit; at a 512-token limit that is a mean of ~350 tokens with 20% truncated, close
to what Qwen2.5-0.5B-Instruct writes on MATH at temperature 1 (and to SmolLM2-135M's 330-390
tokens with 41-56% truncated measured here, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import random

TRUNCATED_SHARE = 0.2
MEAN_SHARE, SD_SHARE, MIN_SHARE = 0.6, 0.2, 0.08


def draw_length(rng: random.Random, limit: int) -> int:
    if rng.random() < TRUNCATED_SHARE:
        return limit
    x = rng.gauss(MEAN_SHARE * limit, SD_SHARE * limit)
    return int(min(max(x, MIN_SHARE * limit), limit - 1))


def install(engine, seed: int = 0) -> None:
    """Make `engine` (a VLLMEngine) stop each sample at a drawn length."""
    from vllm import SamplingParams

    from rlvr.rollout import Completion

    rng = random.Random(seed)

    def generate(prompts, n, temperature, max_tokens, return_logprobs=False, top_p=1.0,
                 seeds=None):
        engine._wake()
        flat = [p for p in prompts for _ in range(n)]
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=0,
                                 max_tokens=draw_length(rng, max_tokens), detokenize=False,
                                 stop_token_ids=engine.eos_ids,
                                 logprobs=0 if return_logprobs else None) for _ in flat]
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in flat], params,
                                   use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        texts = engine.tokenizer.batch_decode(ids, skip_special_tokens=True)
        comps = []
        for out, toks, text, sp in zip(outs, ids, texts, params):
            o = out.outputs[0]
            lps = ([step[t].logprob for step, t in zip(o.logprobs, toks)]
                   if return_logprobs else None)
            comps.append(Completion(toks, text, truncated=sp.max_tokens == max_tokens,
                                    logprobs=lps))
        return [comps[i * n:(i + 1) * n] for i in range(len(prompts))]

    engine.generate = generate
