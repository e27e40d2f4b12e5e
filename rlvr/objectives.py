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
REINFORCE; with several updates the clip acts on the later, off-policy ones.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("NSR", "PSR", "W_REINFORCE", "REINFORCE", "GRPO")
GRPO_EPS = 1e-6


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


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO clipped surrogate, summed over masked tokens and divided by `normalizer`.

    logp, old_logp, mask: [B, T]; advantages: [B]. Per token the loss is
    -min(A * rho, A * clip(rho, 1 - eps, 1 + eps)) with rho = exp(logp - old_logp).
    `normalizer` defaults to the mask's token count (token mean). When one optimizer mini-batch is
    split into micro-batches, pass the mini-batch's total token count so that the accumulated
    gradient equals the mini-batch token mean rather than a mean of micro-batch means.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    unclipped = adv * ratio
    clipped = adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = -torch.minimum(unclipped, clipped)
    if normalizer is None:
        normalizer = mask.sum()
    return (per_token * mask).sum() / torch.clamp_min(torch.as_tensor(normalizer,
                                                                        dtype=logp.dtype), 1.0)


@torch.no_grad()
def ratio_stats(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> dict[str, float]:
    """Sums for the clip fraction and ratio statistics over masked tokens (add across batches).

    `n_clipped` counts tokens whose ratio lies outside [1 - eps, 1 + eps]; clip_frac is
    n_clipped / n_tokens.
    """
    m = mask.bool()
    if not m.any():
        return {"n_clipped": 0.0, "n_tokens": 0.0, "ratio_sum": 0.0, "ratio_max": 1.0,
                "ratio_min": 1.0}
    ratio = torch.exp(logp.float() - old_logp.float())[m]
    outside = (ratio < 1.0 - clip_range) | (ratio > 1.0 + clip_range)
    return {
        "n_clipped": float(outside.sum().item()),
        "n_tokens": float(m.sum().item()),
        "ratio_sum": float(ratio.sum().item()),
        "ratio_max": float(ratio.max().item()),
        "ratio_min": float(ratio.min().item()),
    }
