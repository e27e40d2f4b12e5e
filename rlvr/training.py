"""The policy update: optional old log-probs, then clipped policy-gradient mini-batches.

Which samples each optimizer step sees, and what its loss is divided by, is
`objectives.minibatch_schedule` (the paper's semantics by default). Micro-batches are a memory
matter only: a token budget per forward/backward, never a change to the maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr.logprobs import autocast_ctx, collate, pack, token_budget_groups, token_logprobs
from rlvr.objectives import (
    finish_mismatch_stats,
    minibatch_schedule,
    mismatch_stats,
    per_token_loss,
    ratio_stats,
    rollout_is_weights,
)
from rlvr.optimizers import make_optimizer  # noqa: F401 - the one entry point, rlvr.training's


@dataclass
class UpdateBatch:
    """One step's rollouts as the update sees them (samples of one prompt contiguous)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: torch.Tensor  # [B]
    keep: torch.Tensor        # [B] bool
    # The engine's log-probs of the sampled tokens, when it returned them (IS weights, gap stats).
    sampler_logprobs: list[list[float]] | None = None

    def seq_len(self, i: int) -> int:
        return len(self.prompts[i]) + len(self.responses[i])


def micro_batches(idx: list[int], batch: UpdateBatch, max_tokens: int | None,
                  max_samples: int | None = None, packed: bool = False) -> list[list[int]]:
    """Split `idx` into forward/backward batches of at most `max_tokens` padded tokens (and
    `max_samples` samples), longest first, so samples of similar length share a batch and a too
    large budget fails on the first micro-batch rather than halfway through the step. `packed`
    batches have no padding: the budget counts real tokens (logprobs.token_budget_groups)."""
    if packed:
        groups = token_budget_groups([batch.seq_len(i) for i in idx], max_tokens, max_samples)
        return [[idx[j] for j in g] for g in groups]
    order = sorted(idx, key=batch.seq_len, reverse=True)
    out: list[list[int]] = []
    for i in order:
        cur = out[-1] if out else None
        # padded size of `cur` + i = (len(cur) + 1) x the longest, which is cur[0]
        fits = cur is not None and (max_tokens is None
                                    or (len(cur) + 1) * batch.seq_len(cur[0]) <= max_tokens)
        if fits and (max_samples is None or len(cur) < max_samples):
            cur.append(i)
        else:
            out.append([i])
    return out


# A no-grad forward keeps no activations, so it can take several micro-batches' tokens at once.
NO_GRAD_BATCH_FACTOR = 4


@torch.no_grad()
def compute_old_logprobs(model, batch: UpdateBatch, temperature: float, micro_batch_tokens: int,
                         pad_id: int, device: torch.device, with_entropy: bool = True,
                         packed: bool = False) -> tuple[list[torch.Tensor], float]:
    """log pi of every sampled token under `model` (no grad), and the mean entropy.

    With `model` = the policy before the step's first update this is pi_old: a fixed reference
    for later mini-batches, so the PPO ratio can move away from 1. With a frozen copy of the
    initial policy it gives the KL term's reference log-probs.
    """
    was_training = model.training
    model.eval()
    old: list[torch.Tensor] = [torch.empty(0)] * len(batch.responses)
    ent_sum, n_tok = 0.0, 0
    for mb in micro_batches(list(range(len(batch.responses))), batch,
                            micro_batch_tokens * NO_GRAD_BATCH_FACTOR, packed=packed):
        b = _batch(batch, mb, pad_id, device, packed)
        with autocast_ctx(device):
            logp, ent = token_logprobs(model, b, temperature, with_entropy=with_entropy)
        if with_entropy:
            ent_sum += ent.sum().item()
        n_tok += int(b["response_mask"].sum().item())
        for j, i in enumerate(mb):
            old[i] = logp[j, :len(batch.responses[i])].float().cpu()
    model.train(was_training)
    return old, ent_sum / max(n_tok, 1)


def needs_old_logprobs(batch: UpdateBatch, mini_batch_size: int, loss_agg: str) -> bool:
    """Whether the step takes more than one optimizer update, so that pi_old must be fixed
    before the first one (see `objectives.minibatch_schedule` for what each update sees)."""
    n = int(batch.keep.sum()) if loss_agg == "paper" else len(batch.responses)
    return n > mini_batch_size


def _batch(batch: UpdateBatch, idx: list[int], pad_id: int, device: torch.device,
           packed: bool) -> dict:
    prompts, responses = [batch.prompts[i] for i in idx], [batch.responses[i] for i in idx]
    return pack(prompts, responses, device) if packed else collate(prompts, responses, pad_id,
                                                                   device)


def _padded(rows: list[torch.Tensor | list[float]], like: torch.Tensor) -> torch.Tensor:
    """rows left-aligned in a zero tensor shaped like `like`, built on the host and copied to
    its device in one non-blocking copy (a blocking copy would wait for the GPU's queue)."""
    out = torch.zeros(like.shape, dtype=like.dtype)
    for j, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=out.dtype)
        out[j, :len(r)] = r
    return out.to(like.device, non_blocking=True)


class _MiniBatchSums:
    """One mini-batch's loss and statistics, summed on the device. Reading a GPU value waits for
    the work queued before it, so reading these after every micro-batch (~9 reads) would stall
    the CPU behind each backward; they are read once, with the gradient norm, per optimizer step
    (and the micro-batch's host-to-GPU copies are non-blocking, for the same reason)."""

    SUMS = ("loss", "entropy", "n_clipped", "n_tokens", "ratio_sum")

    def __init__(self, device: torch.device) -> None:
        self.sums = {k: torch.zeros((), device=device) for k in self.SUMS}
        self.ratio_max = torch.full((), -math.inf, device=device)
        self.ratio_min = torch.full((), math.inf, device=device)

    def add(self, loss: torch.Tensor, entropy_sum: torch.Tensor,
            ratio: dict[str, torch.Tensor]) -> None:
        self.sums["loss"] += loss.detach().float()
        self.sums["entropy"] += entropy_sum.detach().float()
        for k in ("n_clipped", "n_tokens", "ratio_sum"):
            self.sums[k] += ratio[k]
        # fmax/fmin skip a NaN micro-batch's extremes, as Python's max/min did before
        self.ratio_max = torch.fmax(self.ratio_max, ratio["ratio_max"])
        self.ratio_min = torch.fmin(self.ratio_min, ratio["ratio_min"])

    def read(self, grad_norm: torch.Tensor) -> dict[str, float]:
        """The one GPU sync of the optimizer step."""
        vals = torch.stack([*self.sums.values(), self.ratio_max, self.ratio_min,
                            grad_norm.detach().float().to(self.ratio_max.device)]).tolist()
        return dict(zip((*self.SUMS, "ratio_max", "ratio_min", "grad_norm"), vals))


class _Stats:
    """Running sums of what one step's update reports."""

    def __init__(self) -> None:
        self.loss = self.grad_norm = self.entropy = 0.0
        self.n_updates = self.n_nonfinite = 0
        self.ratio = {"n_clipped": 0.0, "n_tokens": 0.0, "ratio_sum": 0.0,
                      "ratio_max": -math.inf, "ratio_min": math.inf}
        self.mismatch: list[dict[str, float]] = []

    def add_minibatch(self, r: dict[str, float]) -> None:
        """Ratio and entropy figures of every mini-batch (a non-finite one included); the loss
        and gradient norm only of those that stepped (`add_update`)."""
        self.ratio["ratio_max"] = max(self.ratio["ratio_max"], r["ratio_max"])
        self.ratio["ratio_min"] = min(self.ratio["ratio_min"], r["ratio_min"])
        for k in ("n_clipped", "n_tokens", "ratio_sum"):
            self.ratio[k] += r[k]
        self.entropy += r["entropy"]

    def add_update(self, r: dict[str, float]) -> None:
        self.loss += r["loss"]
        self.grad_norm += r["grad_norm"]
        self.n_updates += 1

    def result(self, n_skipped_empty: int) -> dict[str, float]:
        n_up, n_tok = max(self.n_updates, 1), self.ratio["n_tokens"]
        return {
            "loss": self.loss / n_up if self.n_updates else float("nan"),
            "grad_norm": self.grad_norm / n_up if self.n_updates else 0.0,
            "n_updates": self.n_updates,
            "skipped_empty_minibatches": n_skipped_empty,
            "nonfinite_minibatches": self.n_nonfinite,
            "clip_frac": self.ratio["n_clipped"] / max(n_tok, 1.0),
            "ratio_mean": self.ratio["ratio_sum"] / n_tok if n_tok else 1.0,
            "ratio_max": self.ratio["ratio_max"] if n_tok else 1.0,
            "ratio_min": self.ratio["ratio_min"] if n_tok else 1.0,
            "entropy": self.entropy / n_tok if n_tok else float("nan"),
            "train_tokens": n_tok,
            **finish_mismatch_stats(self.mismatch),
        }


def policy_update(model, optimizer, batch: UpdateBatch, old_logp: list[torch.Tensor] | None, *,
                  temperature: float, clip_range: float, mini_batch_size: int,
                  max_grad_norm: float, pad_id: int, device: torch.device,
                  generator: torch.Generator, micro_batch_size: int | None = None,
                  micro_batch_tokens: int | None = None, loss_agg: str = "paper",
                  entropy_coef: float = 0.0, kl_coef: float = 0.0,
                  ref_logp: list[torch.Tensor] | None = None, rollout_is: str = "none",
                  rollout_is_cap: float = 2.0, packed: bool = False) -> dict[str, float]:
    """One pass over the step's samples, one optimizer step per mini-batch of the schedule.

    `old_logp` None takes pi_old from the update's own forward (detached), which is exact when the
    step has a single optimizer update: pi_old is then the very policy being differentiated, so
    the ratio is exactly 1 and no separate no-grad pass is needed. Micro-batches hold at most
    `micro_batch_tokens` padded tokens (and `micro_batch_size` samples) and accumulate gradients;
    the schedule's normaliser makes them add up to the mini-batch loss. With `packed` they carry
    no padding (`logprobs.pack`) and the budget counts real tokens; on a GPU call
    `attention.enable_packed_attention(model)` first. A mini-batch whose loss or gradient is not
    finite skips optimizer.step().
    """
    B = len(batch.responses)
    order = torch.randperm(B, generator=generator).tolist() if mini_batch_size < B else list(
        range(B))
    lengths = [len(r) for r in batch.responses]
    schedule = minibatch_schedule(batch.keep.tolist(), lengths, mini_batch_size, loss_agg, order)
    if old_logp is None and len(schedule) > 1:
        raise ValueError("old_logp=None needs a single optimizer update per step "
                         f"(this step has {len(schedule)})")
    n_possible = math.ceil(B / mini_batch_size) if loss_agg != "paper" else len(schedule)
    stats = _Stats()
    model.train()
    for mini in schedule:
        optimizer.zero_grad(set_to_none=True)
        sums = _MiniBatchSums(device)
        for micro in micro_batches(mini.indices, batch, micro_batch_tokens, micro_batch_size,
                                   packed=packed):
            b = _batch(batch, micro, pad_id, device, packed)
            mask = b["response_mask"]
            with autocast_ctx(device):
                logp, entropy = token_logprobs(model, b, temperature, with_entropy=True,
                                               entropy_grad=entropy_coef > 0)
            old = logp.detach() if old_logp is None else _padded([old_logp[i] for i in micro],
                                                                  mask)
            sampler = (_padded([batch.sampler_logprobs[i] for i in micro], mask)
                       if batch.sampler_logprobs is not None else None)
            weights = (rollout_is_weights(old, sampler, mask, rollout_is, rollout_is_cap)
                       if rollout_is != "none" else None)
            ref = _padded([ref_logp[i] for i in micro], mask) if kl_coef else None
            adv = batch.advantages[micro].to(device, non_blocking=True)
            per_tok = per_token_loss(logp, old, adv, clip_range,
                                     is_weights=weights, entropy=entropy,
                                     entropy_coef=entropy_coef, ref_logp=ref, kl_coef=kl_coef)
            loss = (per_tok * mask).sum() / mini.normalizer
            loss.backward()
            sums.add(loss, (entropy.detach() * mask).sum(), ratio_stats(logp, old, mask,
                                                                        clip_range))
            if sampler is not None:  # gap figures: read per micro-batch, on the few steps with them
                stats.mismatch.append(mismatch_stats(old, sampler, mask, weights))
        got = sums.read(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        stats.add_minibatch(got)
        if not (math.isfinite(got["loss"]) and math.isfinite(got["grad_norm"])):
            optimizer.zero_grad(set_to_none=True)
            stats.n_nonfinite += 1
            continue
        optimizer.step()
        stats.add_update(got)
    optimizer.zero_grad(set_to_none=True)
    return stats.result(n_possible - len(schedule))
