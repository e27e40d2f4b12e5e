"""The policy update of one step: the mini-batch schedule, pi_old and reference log-probs when
needed, then one clipped policy-gradient optimizer step per mini-batch.

Which samples each optimizer step sees, and what its loss is divided by, is
`objectives.minibatch_schedule` (the paper's semantics by default). Micro-batches are a memory
matter only: a token budget per forward/backward, never a change to the maths.

Data parallel (rlvr/dist.py): each rank holds its own whole prompt groups of the step's batch.
The schedule is decided over the global batch (every rank derives the same one from the gathered
keep flags and lengths and the one shared generator), every loss is divided by the global
normaliser, and every rank runs as many forward/backward passes as the busiest one (empty passes
where it has fewer samples), so the gradient is the one-process gradient of the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rlvr import dist
from rlvr.logprobs import autocast_ctx, collate, pack, token_budget_groups
from rlvr.objectives import (
    MiniBatch,
    finish_mismatch_stats,
    minibatch_schedule,
    mismatch_stats,
    per_token_loss,
    ratio_stats,
    rollout_is_weights,
)


@dataclass
class UpdateBatch:
    """This rank's rollouts of one step as the update sees them (samples of a prompt contiguous)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: torch.Tensor  # [B] float
    keep: torch.Tensor        # [B] bool
    # The engine's log-probs of the sampled tokens, when it returned them (IS weights, gap stats).
    sampler_logprobs: list[list[float]] | None = None

    def seq_len(self, i: int) -> int:
        return len(self.prompts[i]) + len(self.responses[i])


@dataclass(frozen=True)
class UpdateSettings:
    """Everything about an update that is fixed for a run (its flags and memory plan)."""
    temperature: float
    clip_range: float
    mini_batch_size: int      # samples per optimizer step, over the global batch
    max_grad_norm: float
    pad_id: int
    device: torch.device
    micro_batch_tokens: int | None = None  # padded (packed: real) tokens per forward/backward
    loss_agg: str = "paper"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    rollout_is: str = "none"
    rollout_is_cap: float = 2.0
    packed: bool = False      # varlen micro-batches; call attention.enable_packed_attention first

    @classmethod
    def for_run(cls, cfg, mem, pad_id: int, device: torch.device) -> UpdateSettings:
        """From a run's Config and resolved memory plan (run_plan.Resolved)."""
        return cls(temperature=cfg.temperature, clip_range=cfg.clip_range,
                   mini_batch_size=cfg.mini_batch, max_grad_norm=cfg.max_grad_norm,
                   pad_id=pad_id, device=device, micro_batch_tokens=mem.micro_batch_tokens,
                   loss_agg=cfg.loss_agg, entropy_coef=cfg.entropy_coef, kl_coef=cfg.kl_coef,
                   rollout_is=cfg.rollout_is, rollout_is_cap=cfg.rollout_is_cap,
                   packed=mem.packed)


def micro_batches(idx: list[int], seq_lens: Sequence[int], max_tokens: int | None,
                  packed: bool = False) -> list[list[int]]:
    """Split `idx` (indices into `seq_lens`) into forward/backward batches of at most
    `max_tokens` padded tokens, longest first, so samples of similar length share a batch and a
    too large budget fails on the first micro-batch rather than halfway through the step.
    `packed` batches have no padding: the budget counts real tokens
    (logprobs.token_budget_groups)."""
    if packed:
        groups = token_budget_groups([seq_lens[i] for i in idx], max_tokens)
        return [[idx[j] for j in g] for g in groups]
    out: list[list[int]] = []
    for i in sorted(idx, key=lambda i: seq_lens[i], reverse=True):
        cur = out[-1] if out else None
        # padded size of `cur` + i = (len(cur) + 1) x the longest, which is cur[0]
        if cur is not None and (max_tokens is None
                                or (len(cur) + 1) * seq_lens[cur[0]] <= max_tokens):
            cur.append(i)
        else:
            out.append([i])
    return out


def rank_micro_batches(indices: Sequence[int], seq_lens: Sequence[int], world: int, rank: int,
                       max_tokens: int | None, packed: bool = False) -> list[list[int]]:
    """This rank's micro-batches of one pass over `indices` (global sample indices; rank r holds
    samples r*n..(r+1)*n-1 of the `seq_lens` of all ranks), as local indices, padded with empty
    micro-batches to the most any rank has. Every rank can compute every rank's split from the
    global lengths, so all agree on the count without a collective: a rank running fewer
    forward/backward passes than the others would leave them waiting in a collective for ever."""
    n = len(seq_lens) // world

    def split(r: int) -> list[list[int]]:
        local = [g - r * n for g in indices if r * n <= g < (r + 1) * n]
        return micro_batches(local, seq_lens[r * n:(r + 1) * n], max_tokens, packed)

    mine = split(rank)
    most = max(len(split(r)) for r in range(world)) if world > 1 else len(mine)
    return mine + [[] for _ in range(most - len(mine))]


@dataclass(frozen=True)
class GlobalBatch:
    """What every rank knows of the whole step's batch: enough to plan it identically."""
    keep: list[bool]
    response_lens: list[int]
    seq_lens: list[int]
    world: int
    rank: int

    @classmethod
    def gather(cls, batch: UpdateBatch) -> GlobalBatch:
        local = torch.tensor([[int(k), len(r), batch.seq_len(i)] for i, (k, r) in
                              enumerate(zip(batch.keep.tolist(), batch.responses))],
                             dtype=torch.long).reshape(-1, 3)
        rows = dist.all_gather_rows(local).tolist()  # [dist] the global batch, rank by rank
        w = dist.world()
        return cls([bool(k) for k, _, _ in rows], [r for _, r, _ in rows],
                   [s for _, _, s in rows], w.size, w.rank)

    def schedule(self, s: UpdateSettings, generator: torch.Generator) -> list[MiniBatch]:
        """The mini-batches over global indices: the same permutation and subsets on every rank
        (the generator's state is the same everywhere), the normalisers from global counts."""
        n = len(self.keep)
        order = (torch.randperm(n, generator=generator).tolist() if s.mini_batch_size < n
                 else list(range(n)))
        return minibatch_schedule(self.keep, self.response_lens, s.mini_batch_size, s.loss_agg,
                                  order)

    def micro(self, indices: Sequence[int], max_tokens: int | None,
              packed: bool) -> list[list[int]]:
        return rank_micro_batches(indices, self.seq_lens, self.world, self.rank, max_tokens,
                                  packed)


# A no-grad forward keeps no activations, so it can take several micro-batches' tokens at once.
NO_GRAD_BATCH_FACTOR = 4


def _batch(batch: UpdateBatch, idx: list[int], s: UpdateSettings) -> dict:
    # an empty micro-batch (a rank with fewer samples than another) is one pad token with no
    # response: its forward/backward takes part in the collectives and contributes zero
    prompts = [batch.prompts[i] for i in idx] or [[s.pad_id]]
    responses = [batch.responses[i] for i in idx] or [[]]
    return pack(prompts, responses, s.device) if s.packed else collate(prompts, responses,
                                                                       s.pad_id, s.device)


@torch.no_grad()
def compute_old_logprobs(model, batch: UpdateBatch, s: UpdateSettings, with_entropy: bool = False,
                         plan: GlobalBatch | None = None) -> tuple[list[torch.Tensor], float]:
    """log pi of every sampled token of this rank under `model` (a PolicyLogprobs, possibly
    wrapped), no grad, and the mean entropy of this rank's tokens.

    With the policy before the step's first update this is pi_old: a fixed reference for later
    mini-batches, so the PPO ratio can move away from 1. With a frozen copy of the initial policy
    it gives the KL term's reference log-probs.
    """
    plan = plan or GlobalBatch.gather(batch)
    was_training = model.training
    model.eval()
    old: list[torch.Tensor] = [torch.empty(0)] * len(batch.responses)
    ent_sum, n_tok = 0.0, 0
    budget = s.micro_batch_tokens * NO_GRAD_BATCH_FACTOR if s.micro_batch_tokens else None
    for mb in plan.micro(range(len(plan.keep)), budget, s.packed):
        b = _batch(batch, mb, s)
        with autocast_ctx(s.device):
            logp, ent = model(b, s.temperature, with_entropy=with_entropy)
        if with_entropy:
            ent_sum += ent.sum().item()
        n_tok += int(b["response_mask"].sum().item())
        for j, i in enumerate(mb):
            old[i] = logp[j, :len(batch.responses[i])].float().cpu()
    model.train(was_training)
    return old, ent_sum / max(n_tok, 1)


def _padded(rows: list[torch.Tensor | list[float]], like: torch.Tensor) -> torch.Tensor:
    """rows left-aligned in a zero tensor shaped like `like`, built on the host and copied to
    its device in one non-blocking copy (a blocking copy would wait for the GPU's queue)."""
    out = torch.zeros(like.shape, dtype=like.dtype)
    for j, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=out.dtype)
        out[j, :len(r)] = r
    return out.to(like.device, non_blocking=True)


def _gradient_sync(model, last: bool):
    """DDP all-reduces gradients in the backward of the last micro-batch of a mini-batch only;
    FSDP2 reduce-scatters every micro-batch (its sharded gradients accumulate, unsharded ones
    would cost a whole gradient's memory)."""
    if not last and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def _total_norm(norm: torch.Tensor) -> torch.Tensor:
    # FSDP2's parameters are DTensors: clip_grad_norm_ returns the global norm as one
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class _MiniBatchSums:
    """One mini-batch's loss and statistics, summed on the device. Reading a GPU value waits for
    the work queued before it, so reading these after every micro-batch would stall the CPU
    behind each backward; they are read once, with the gradient norm, per optimizer step (and the
    micro-batch's host-to-GPU copies are non-blocking, for the same reason)."""

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
        # fmax/fmin skip a NaN micro-batch's extremes
        self.ratio_max = torch.fmax(self.ratio_max, ratio["ratio_max"])
        self.ratio_min = torch.fmin(self.ratio_min, ratio["ratio_min"])

    def read(self, grad_norm: torch.Tensor) -> dict[str, float]:
        """The one GPU sync of the optimizer step: the figures of the whole (global) mini-batch."""
        local = torch.stack([*self.sums.values(), self.ratio_max, -self.ratio_min])
        ranks = dist.all_gather_rows(local[None])  # [dist] one row per rank
        n = len(self.SUMS)
        sums = ranks[:, :n].sum(0)
        extremes = ranks[:, n:].nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(0)
        vals = torch.cat([sums, extremes * torch.tensor([1.0, -1.0], device=extremes.device),
                          _total_norm(grad_norm).detach().float().to(sums.device)[None]]).tolist()
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
        # [dist] the gap figures of every rank's micro-batches
        mismatch = [p for parts in dist.all_gather_objects(self.mismatch) for p in parts]
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
            **finish_mismatch_stats(mismatch),
        }


def policy_update(model, optimizer: torch.optim.Optimizer, batch: UpdateBatch,
                  s: UpdateSettings, generator: torch.Generator,
                  ref_model=None) -> dict[str, float]:
    """One pass over the step's samples, one optimizer step per mini-batch of the schedule.

    `model` is the policy as a PolicyLogprobs (wrapped by DDP or sharded by FSDP2 in a
    multi-GPU run); `ref_model` the frozen reference for `s.kl_coef`, likewise. The schedule
    comes first: with a single optimizer update pi_old is the very policy being differentiated,
    so it comes from the update's own forward (detached; ratio exactly 1, no separate pass);
    with several, a no-grad pass fixes it before the first. Micro-batches hold at most
    `s.micro_batch_tokens` tokens and accumulate gradients; the schedule's normaliser makes them
    add up to the mini-batch loss. A mini-batch whose loss or gradient is not finite (on any
    rank: the figures are global) skips optimizer.step().
    """
    plan = GlobalBatch.gather(batch)
    schedule = plan.schedule(s, generator)
    n_possible = (math.ceil(len(plan.keep) / s.mini_batch_size) if s.loss_agg != "paper"
                  else len(schedule))
    old_logp = None
    if len(schedule) > 1:
        old_logp, _ = compute_old_logprobs(model, batch, s, plan=plan)
    ref_logp = None
    if s.kl_coef:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs the reference model")
        ref_logp, _ = compute_old_logprobs(ref_model, batch, s, plan=plan)
    stats = _Stats()
    model.train()
    for mini in schedule:
        optimizer.zero_grad(set_to_none=True)
        got = _minibatch(model, batch, s, mini, plan, old_logp, ref_logp, stats)
        stats.add_minibatch(got)
        if not (math.isfinite(got["loss"]) and math.isfinite(got["grad_norm"])):
            optimizer.zero_grad(set_to_none=True)
            stats.n_nonfinite += 1
            continue
        optimizer.step()
        stats.add_update(got)
    optimizer.zero_grad(set_to_none=True)
    out = stats.result(n_possible - len(schedule))
    out["separate_old_logprob_pass"] = float(old_logp is not None)
    return out


def _minibatch(model, batch: UpdateBatch, s: UpdateSettings, mini: MiniBatch, plan: GlobalBatch,
               old_logp, ref_logp, stats: _Stats) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches of one mini-batch, then the gradient
    clipped on its global norm; the mini-batch's figures."""
    sums = _MiniBatchSums(s.device)
    micros = plan.micro(mini.indices, s.micro_batch_tokens, s.packed)
    # Each rank's loss is its tokens' share of the global mini-batch loss; DDP and FSDP average
    # gradients over ranks, so dividing by normaliser / world size makes the average their sum:
    # the gradient of the one-process loss on the same batch.
    rank_normalizer = mini.normalizer / plan.world
    for k, micro in enumerate(micros):
        b = _batch(batch, micro, s)
        mask = b["response_mask"]
        with _gradient_sync(model, last=k == len(micros) - 1):
            with autocast_ctx(s.device):
                logp, entropy = model(b, s.temperature, with_entropy=True,
                                      entropy_grad=s.entropy_coef > 0)
            old = logp.detach() if old_logp is None else _padded([old_logp[i] for i in micro],
                                                                  mask)
            sampler = (_padded([batch.sampler_logprobs[i] for i in micro], mask)
                       if batch.sampler_logprobs is not None else None)
            weights = (rollout_is_weights(old, sampler, mask, s.rollout_is, s.rollout_is_cap)
                       if s.rollout_is != "none" else None)
            ref = _padded([ref_logp[i] for i in micro], mask) if s.kl_coef else None
            adv = (batch.advantages[micro] if micro else torch.zeros(1)).to(s.device,
                                                                            non_blocking=True)
            per_tok = per_token_loss(logp, old, adv, s.clip_range, is_weights=weights,
                                     entropy=entropy, entropy_coef=s.entropy_coef, ref_logp=ref,
                                     kl_coef=s.kl_coef)
            loss_sum = (per_tok * mask).sum()
            (loss_sum / rank_normalizer).backward()
        sums.add(loss_sum / mini.normalizer, (entropy.detach() * mask).sum(),
                 ratio_stats(logp, old, mask, s.clip_range))
        if sampler is not None and micro:  # gap figures: read per micro-batch, on few steps
            stats.mismatch.append(mismatch_stats(old, sampler, mask, weights))
    return sums.read(torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm))
