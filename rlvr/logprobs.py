"""Log-probs of sampled tokens under the training policy, without a [B, T, vocab] fp32 tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Tokens per chunk when projecting hidden states onto the vocabulary: 2,048 x 151,936 logits in fp32
# is 1.2 GB, small next to the model, while a whole 64 x 512 batch would be 20 GB.
LOGIT_CHUNK_TOKENS = 2048


def autocast_ctx(device: torch.device):
    """bf16 compute on GPU; fp32 on CPU (bf16 matmuls are slow there, tests want exactness)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _chunk_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                inv_temp: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() * inv_temp
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logp_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        inv_temp: float, entropy_grad: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float() * inv_temp
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    # H = lse - sum_v p_v * logit_v; without an entropy bonus no gradient flows through it, so
    # keep it out of the autograd graph (nothing of it saved for backward)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False,
    chunk_tokens: int = LOGIT_CHUNK_TOKENS, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens under the sampling distribution (logits / T).

    `batch` comes from `collate`: right-padded `input_ids`/`attention_mask` [B, L] and, for the
    response tokens, `positions` [B, T] (index of the hidden state that predicts each token),
    `targets` [B, T] and `response_mask` [B, T]. Only the response positions are projected onto
    the vocabulary, in chunks; under autograd each chunk is recomputed in backward, so no more than
    one chunk of fp32 logits is alive at a time. With `with_entropy` the per-token entropy [B, T]
    comes too; it carries a gradient only with `entropy_grad` (an entropy bonus).
    """
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    b_idx = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(-1)
    h = hidden[b_idx, batch["positions"]]  # [B, T, H]
    flat_h = h.reshape(-1, h.shape[-1])
    flat_t = batch["targets"].reshape(-1)
    weight = model.lm_head.weight
    inv_temp = 1.0 / temperature
    logps, ents = [], []
    for s in range(0, flat_h.shape[0], chunk_tokens):
        hc, tc = flat_h[s:s + chunk_tokens], flat_t[s:s + chunk_tokens]
        if with_entropy and torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logp_entropy, hc, weight, tc, inv_temp, entropy_grad,
                                 use_reentrant=False)
        elif with_entropy:
            lp, ent = _chunk_logp_entropy(hc, weight, tc, inv_temp)
        elif torch.is_grad_enabled():
            lp = checkpoint(_chunk_logp, hc, weight, tc, inv_temp, use_reentrant=False)
        else:
            lp = _chunk_logp(hc, weight, tc, inv_temp)
        logps.append(lp)
        if with_entropy:
            ents.append(ent)
    shape = batch["targets"].shape
    mask = batch["response_mask"]
    logp = torch.cat(logps).view(shape) * mask
    entropy = torch.cat(ents).view(shape) * mask if with_entropy else None
    return logp, entropy


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids, with gather indices for the response tokens.

    Right padding keeps the default position ids (0..len-1) correct for every real token, so no
    position_ids need to be passed and HF's forward matches the engine's.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs)
    T = max(1, max(len(r) for r in responses))
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        if r:
            positions[i, :len(r)] = torch.arange(len(p) - 1, n - 1)
            targets[i, :len(r)] = torch.tensor(r)
            rmask[i, :len(r)] = 1.0
    out = {"input_ids": input_ids, "attention_mask": attn, "positions": positions,
           "targets": targets, "response_mask": rmask}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}
