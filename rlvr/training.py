"""The policy update: old log-probs once per step, then clipped policy-gradient mini-batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr.logprobs import autocast_ctx, collate, token_logprobs
from rlvr.objectives import clipped_policy_loss, ratio_stats


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95) and a constant learning rate (no warm-up, no schedule).

    Its state is allocated here rather than at the first real step: allocated mid-step, the
    2 x fp32 moment buffers land in memory segments shared with activations, and those segments
    can never be returned to the driver while vLLM needs the memory (3B measured 82-90 GB).
    """
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                            weight_decay=weight_decay, eps=1e-8, fused=fused)
    _allocate_state(opt)
    return opt


@torch.no_grad()
def _allocate_state(opt: torch.optim.Optimizer) -> None:
    """Run one step with zero gradients and lr = weight decay = 0, then reset the step counters.

    The weights do not move (every update term is multiplied by lr = 0), the moments stay exactly
    zero, and with step = 0 the next step is a true first step, bias correction included.
    """
    saved = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
        opt.state[p]["step"].zero_()
    for g, (lr, wd) in zip(opt.param_groups, saved):
        g["lr"], g["weight_decay"] = lr, wd


@dataclass
class UpdateBatch:
    """One step's rollouts as the update sees them (samples of one prompt contiguous)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: torch.Tensor  # [B]
    keep: torch.Tensor        # [B] bool


def _micro_batches(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def _by_length(idx: list[int], batch: UpdateBatch) -> list[int]:
    """Order samples by total length so each micro-batch pads to a similar length."""
    return sorted(idx, key=lambda i: len(batch.prompts[i]) + len(batch.responses[i]))


# A no-grad forward keeps no activations, so it can take several micro-batches at once.
NO_GRAD_BATCH_FACTOR = 4


@torch.no_grad()
def compute_old_logprobs(model, batch: UpdateBatch, temperature: float, micro_batch_size: int,
                         pad_id: int, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """log pi_old of every sampled token (the policy that generated the rollouts) and mean entropy.

    Computed once, before the step's first update, so later mini-batches have a fixed reference
    and the PPO ratio can move away from 1.
    """
    model.eval()
    old: list[torch.Tensor] = [torch.empty(0)] * len(batch.responses)
    ent_sum, n_tok = 0.0, 0
    order = _by_length(list(range(len(batch.responses))), batch)
    for mb in _micro_batches(order, micro_batch_size * NO_GRAD_BATCH_FACTOR):
        b = collate([batch.prompts[i] for i in mb], [batch.responses[i] for i in mb], pad_id,
                    device)
        with autocast_ctx(device):
            logp, ent = token_logprobs(model, b, temperature, with_entropy=True)
        ent_sum += ent.sum().item()
        n_tok += int(b["response_mask"].sum().item())
        for j, i in enumerate(mb):
            old[i] = logp[j, :len(batch.responses[i])].float().cpu()
    model.train()
    return old, ent_sum / max(n_tok, 1)


def policy_update(model, optimizer, batch: UpdateBatch, old_logp: list[torch.Tensor], *,
                  temperature: float, clip_range: float, mini_batch_size: int,
                  micro_batch_size: int, max_grad_norm: float, pad_id: int,
                  device: torch.device, generator: torch.Generator) -> dict[str, float]:
    """One pass over the step's samples in mini-batches, one optimizer step per mini-batch.

    The loss of a mini-batch is the token mean over all response tokens of its kept samples; the
    micro-batches accumulate gradients with the mini-batch's token count as normaliser. A
    mini-batch with no kept sample, or with a non-finite loss or gradient, skips optimizer.step():
    AdamW would otherwise still move the weights through momentum and weight decay.
    """
    B = len(batch.responses)
    shuffle = mini_batch_size < B
    order = torch.randperm(B, generator=generator).tolist() if shuffle else list(range(B))
    stats = {"loss_sum": 0.0, "n_updates": 0, "n_skipped_empty": 0, "n_nonfinite": 0,
             "grad_norm_sum": 0.0, "n_clipped": 0.0, "n_tokens": 0.0, "ratio_sum": 0.0,
             "ratio_max": -math.inf, "ratio_min": math.inf}
    model.train()
    for mini in _micro_batches(order, mini_batch_size):
        kept = [i for i in mini if bool(batch.keep[i]) and batch.responses[i]]
        if not kept:
            stats["n_skipped_empty"] += 1
            continue
        n_tokens = sum(len(batch.responses[i]) for i in kept)
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for micro in _micro_batches(_by_length(kept, batch), micro_batch_size):
            b = collate([batch.prompts[i] for i in micro], [batch.responses[i] for i in micro],
                        pad_id, device)
            old = torch.zeros_like(b["response_mask"])
            for j, i in enumerate(micro):
                old[j, :len(batch.responses[i])] = old_logp[i].to(device)
            adv = batch.advantages[micro].to(device)
            with autocast_ctx(device):
                logp, _ = token_logprobs(model, b, temperature)
            loss = clipped_policy_loss(logp, old, adv, b["response_mask"], clip_range,
                                       normalizer=n_tokens)
            loss.backward()
            loss_total += loss.item()
            for k, v in ratio_stats(logp, old, b["response_mask"], clip_range).items():
                if k == "ratio_max":
                    stats[k] = max(stats[k], v)
                elif k == "ratio_min":
                    stats[k] = min(stats[k], v)
                else:
                    stats[k] += v
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            stats["n_nonfinite"] += 1
            continue
        optimizer.step()
        stats["loss_sum"] += loss_total
        stats["grad_norm_sum"] += grad_norm
        stats["n_updates"] += 1
    optimizer.zero_grad(set_to_none=True)
    n_up = max(stats["n_updates"], 1)
    n_tok = max(stats["n_tokens"], 1.0)
    return {
        "loss": stats["loss_sum"] / n_up if stats["n_updates"] else float("nan"),
        "grad_norm": stats["grad_norm_sum"] / n_up if stats["n_updates"] else 0.0,
        "n_updates": stats["n_updates"],
        "skipped_empty_minibatches": stats["n_skipped_empty"],
        "nonfinite_minibatches": stats["n_nonfinite"],
        "clip_frac": stats["n_clipped"] / n_tok,
        "ratio_mean": stats["ratio_sum"] / n_tok if stats["n_tokens"] else 1.0,
        "ratio_max": stats["ratio_max"] if stats["n_tokens"] else 1.0,
        "ratio_min": stats["ratio_min"] if stats["n_tokens"] else 1.0,
        "train_tokens": stats["n_tokens"],
    }
