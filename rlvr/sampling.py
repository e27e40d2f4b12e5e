"""Seeded sampling: each request draws from a random stream of its own.

A request's samples then depend only on its seed (and the model), never on which other requests
share its batch, how a call is chunked, which rank of a data-parallel job generates it, or whether
an evaluation was interrupted and resumed. Both engines follow the same rule: sample j of a request
with seed s uses seed s + j (vLLM's own rule for the children of an n > 1 request).
"""

from __future__ import annotations

import hashlib

import torch

# vLLM gives sample j of a request the seed s + j: keep s + j inside a signed 32-bit range.
SEED_RANGE = 2**31 - 2**20


def sampling_seed(*keys: object) -> int:
    """A request's seed from what identifies it (run seed, dataset, problem, step, ...).

    Stable across processes and Python versions (unlike hash()): keys are joined as text.
    """
    text = "\x1f".join(str(k) for k in keys)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_RANGE


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` [B, V] with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token is always kept), as transformers' TopPLogitsWarper and vLLM define it.
    """
    if top_p >= 1.0:
        return logits
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class RowSampler:
    """A transformers logits processor that samples each row from its own generator.

    HF `generate` samples a whole batch from torch's one global stream, so a row's tokens would
    depend on every other row. This processor draws each row's token itself (temperature, then
    nucleus, then inverse-CDF sampling with the row's generator) and hands back a one-hot score,
    so `generate` run greedily keeps exactly that token. It records the log-prob of each drawn
    token under the processed distribution (temperature and nucleus applied), which is what the
    engines report as the sampler's log-probs.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p
        self.logprobs: list[torch.Tensor] = []  # one [B] tensor per decode step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = top_p_mask(scores.float() / self.temperature, self.top_p)
        logp = logits.log_softmax(-1)
        cdf = logp.exp().cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.generators])
        # right side: a zero-probability token (flat CDF) is never the first to exceed u * total
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        self.logprobs.append(logp.gather(-1, tokens).squeeze(-1).cpu())
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(-1, tokens, 0.0)
