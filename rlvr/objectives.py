"""Advantages and the clipped policy-gradient loss for NSR, PSR, W-REINFORCE, REINFORCE and GRPO.

Following Zhu et al. (2025), every objective is a REINFORCE-style policy gradient whose per-sample
advantage is a function of the binary verifier reward alone (no critic, no KL, no reference model):

    PSR          A = +1 on correct samples; incorrect samples are dropped
    NSR          A = -1 on incorrect samples; correct samples are dropped
    W_REINFORCE  A = +lambda on correct, -1 on incorrect
    REINFORCE    W_REINFORCE with lambda = 1
    GRPO         A = (r - mean_group) / (std_group + 1e-6), unbiased std over one prompt's rollouts

The advantage is broadcast over the sample's response tokens and plugged into the PPO clipped
surrogate. With one optimizer update per rollout batch the ratio is exactly 1 and the loss is plain
REINFORCE; with several updates the clip acts on the later, off-policy ones. Optional per-token
terms: an entropy bonus, a k3 KL to a reference policy, and an importance-sampling weight for the
gap between the sampling engine's and the trainer's log-probs. `minibatch_schedule` says which
samples each optimizer step sees and what its loss is divided by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr.choices import LOSS_AGGREGATIONS, OBJECTIVES

GRPO_EPS = 1e-6
KL_CLAMP = 10.0  # verl's low_var_kl clamps the k3 estimate to [-10, 10]


def compute_advantages(
    correct: torch.Tensor, objective: str, lam: float = 0.1, group_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample advantage and keep mask from verifier rewards.

    `correct` holds one reward in {0, 1} per sample (bool or float); the `group_size` samples of one
    prompt are contiguous. Returns (advantages [B] float32, keep [B] bool). Dropped samples get
    advantage 0 and keep False, so they contribute neither gradient nor tokens to the mean.
    """
    r = correct.detach().to(torch.float32).flatten()
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    is_correct = r > 0.5
    if objective == "PSR":
        keep = is_correct
        adv = torch.where(keep, 1.0, 0.0)
    elif objective == "NSR":
        keep = ~is_correct
        adv = torch.where(keep, -1.0, 0.0)
    elif objective in ("W_REINFORCE", "REINFORCE"):
        weight = 1.0 if objective == "REINFORCE" else float(lam)
        keep = torch.ones_like(is_correct)
        adv = torch.where(is_correct, weight, -1.0)
    else:  # GRPO
        if group_size < 2 or r.numel() % group_size:
            raise ValueError(
                f"GRPO needs group_size >= 2 dividing the batch (got {group_size} for {r.numel()})"
            )
        groups = r.view(-1, group_size)
        # unbiased std, as TRL and verl use; a group with one reward value has std 0 -> A = 0
        adv = ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True)
                                                                + GRPO_EPS)).flatten()
        keep = torch.ones_like(is_correct)
    return adv.to(torch.float32), keep


@torch.no_grad()
def ratio_stats(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> dict[str, torch.Tensor]:
    """Sums for the clip fraction and ratio statistics over masked tokens, as 0-d float tensors
    on logp's device (add across batches). Nothing here reads a value back: on a GPU each read
    waits for the backward in flight, so the caller reads once per optimizer step.

    `n_clipped` counts tokens whose ratio lies outside [1 - eps, 1 + eps]; clip_frac is
    n_clipped / n_tokens. Without masked tokens the max is -inf and the min +inf.
    """
    m = mask.bool()
    if m.numel() == 0:  # no response positions at all (max/min of nothing would raise)
        z = logp.new_zeros((), dtype=torch.float32)
        return {"n_clipped": z, "n_tokens": z, "ratio_sum": z, "ratio_max": z - math.inf,
                "ratio_min": z + math.inf}
    ratio = torch.exp(logp.float() - old_logp.float())
    outside = ((ratio < 1.0 - clip_range) | (ratio > 1.0 + clip_range)) & m
    return {
        "n_clipped": outside.sum().float(),
        "n_tokens": m.sum().float(),
        # where, not a product with the mask: a padding position's ratio may be inf
        "ratio_sum": torch.where(m, ratio, 0.0).sum(),
        "ratio_max": torch.where(m, ratio, -math.inf).max(),
        "ratio_min": torch.where(m, ratio, math.inf).min(),
    }


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step: the samples it trains on and the divisor of their summed token loss."""
    indices: list[int]
    normalizer: float


def minibatch_schedule(keep: list[bool], lengths: list[int], mini_batch_size: int,
                       loss_agg: str, order: list[int]) -> list[MiniBatch]:
    """Mini-batches of one step, in `order` (a permutation of the samples).

    paper: as the paper's code (verl): keep the objective's samples first, then split those into
        mini-batches of `mini_batch_size`, so PSR/NSR take ceil(kept / mini) steps; each step's
        loss is its token mean times len(mini-batch) / mini_batch_size, so a short last mini-batch
        makes a smaller step. (verl takes the token mean per micro-batch, weighted by its share of
        the mini-batch; we take it over the whole mini-batch, so that the micro-batching, a memory
        setting, never changes the maths. The two agree when micro-batches hold equal tokens.)
    batch_token_mean: split all samples first, then drop; the loss is divided by every response
        token of the mini-batch, dropped samples included. PSR and NSR then see the same
        mini-batches as REINFORCE, and grad PSR + grad NSR = grad REINFORCE (lambda = 1).
    A mini-batch with nothing to train on is left out: no optimizer step at all, since AdamW would
    still move the weights through momentum and weight decay.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose from {LOSS_AGGREGATIONS}")
    out = []
    if loss_agg == "paper":
        kept = [i for i in order if keep[i]]
        for s in range(0, len(kept), mini_batch_size):
            chunk = kept[s:s + mini_batch_size]
            tokens = sum(lengths[i] for i in chunk)
            if tokens:
                out.append(MiniBatch(chunk, tokens * mini_batch_size / len(chunk)))
    else:
        for s in range(0, len(order), mini_batch_size):
            chunk = order[s:s + mini_batch_size]
            kept = [i for i in chunk if keep[i]]
            if sum(lengths[i] for i in kept):
                out.append(MiniBatch(kept, float(sum(lengths[i] for i in chunk))))
    return out


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on samples of pi: e^d - d - 1, d = ref - logp.

    Unbiased, never negative, and with a well-behaved gradient (Schulman's "k3"; verl's
    low_var_kl), clamped to [-10, 10] as verl does.
    """
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


@torch.no_grad()
def rollout_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str, cap: float) -> torch.Tensor:
    """Importance weights [B, T] for samples drawn by the engine but trained as pi_old's.

    tis: token-level truncated IS, min(pi_old / pi_sampler, cap) per token (TRL's token_truncate,
        verl's rollout_is=token).
    mis: sequence-level IS with masking: r = prod_t pi_old / pi_sampler over the response; the
        weight is r on every token of the sequence, or 0 where r > cap (TRL's sequence_mask).
    Constant in the backward pass; padding positions get weight 1 (the loss masks them anyway).
    """
    log_r = (old_logp.float() - sampler_logp.float()) * mask
    if mode == "tis":
        return torch.clamp(torch.exp(log_r), max=cap)
    if mode == "mis":
        seq = torch.exp(log_r.sum(-1, keepdim=True))
        return torch.where(seq > cap, 0.0, seq).expand_as(log_r).contiguous()
    raise ValueError(f"unknown rollout_is mode {mode!r}")


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   clip_range: float, *, is_weights: torch.Tensor | None = None,
                   entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                   ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """The per-token loss [B, T] before masking and normalising (see `minibatch_schedule`).

    -min(A * rho, A * clip(rho, 1 - eps, 1 + eps)) * w - entropy_coef * H + kl_coef * k3, with rho
    = exp(logp - old_logp) and w the importance weight (1 without --rollout_is). As in verl, the
    entropy and KL terms are aggregated exactly like the policy-gradient term.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    loss = -torch.minimum(adv * ratio, adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    if is_weights is not None:
        loss = loss * is_weights.to(loss.dtype)
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    if kl_coef:
        loss = loss + kl_coef * kl_k3(logp, ref_logp)
    return loss


def mismatch_stats(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None = None) -> dict[str, float]:
    """Sums and extremes (add across micro-batches) of |log pi_old - log pi_sampler| and the IS
    weights, over masked tokens; finish with `finish_mismatch_stats`."""
    m = mask.bool()
    if not m.any():
        return {}
    gap = (old_logp.float() - sampler_logp.float()).abs()[m]
    out = {"gap_sum": gap.sum().item(), "gap_max": gap.max().item(), "n": float(m.sum().item())}
    if weights is not None:
        w = weights[m]
        out.update(w_sum=w.sum().item(), w_max=w.max().item(), w_min=w.min().item(),
                   w_zero=float((w == 0).sum().item()))
    return out


def finish_mismatch_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    parts = [p for p in parts if p]
    if not parts:
        return {}
    n = sum(p["n"] for p in parts)
    out = {"train/logp_gap_mean": sum(p["gap_sum"] for p in parts) / n,
           "train/logp_gap_max": max(p["gap_max"] for p in parts)}
    if "w_sum" in parts[0]:
        out.update({"train/is_weight_mean": sum(p["w_sum"] for p in parts) / n,
                    "train/is_weight_max": max(p["w_max"] for p in parts),
                    "train/is_weight_min": min(p["w_min"] for p in parts),
                    "train/is_masked_frac": sum(p["w_zero"] for p in parts) / n})
    return out

