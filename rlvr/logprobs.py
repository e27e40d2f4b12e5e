"""Log-probs of sampled tokens under the training policy, without a [B, T, vocab] fp32 tensor.

`PolicyLogprobs` is the one module call of an update (decoder and chunked LM head inside its
forward), so that DDP, FSDP2 and torch.compile see every use of the weights. Two batch layouts,
one contract: `collate` right-pads [B, L]; `pack` concatenates every
sequence into one row [1, N] with no padding (position ids restart at 0 per sequence). Either way
`token_logprobs` returns [B, T] log-probs of the response tokens. Packed attention must not cross
sequences: `enable_packed_attention` installs torch's flash varlen kernel on CUDA; elsewhere
transformers builds a dense block-diagonal mask (exact, but N^2 memory: CPU/tests only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlvr.attention import VARLEN_ATTN, raise_recompile_limit

# Tokens per chunk when projecting hidden states onto the vocabulary: 1,024 x 151,936 logits in fp32
# is 0.6 GB (about three such tensors are alive in the loss), while a whole 64 x 512 batch would be
# 20 GB. The matmul is already large at 1,024 rows and the softmax work is per token, so a smaller
# chunk costs little time and saves memory plan peak (docs/PERFORMANCE.md has the trade-off).
LOGIT_CHUNK_TOKENS = 1024


def autocast_ctx(device: torch.device, cache: bool = False):
    """bf16 compute on GPU; fp32 on CPU (bf16 matmuls are slow there, tests want exactness).

    No weight cache by default: with it autocast keeps a bf16 copy of every fp32 weight until the
    forward ends (5.8 GiB at 3B), although with gradient checkpointing nothing else keeps them;
    without it each copy lives for its layer's matmul (and its recompute in backward). Every
    weight is used once per forward, so this costs no extra casts except the LM head's, once per
    LOGIT_CHUNK_TOKENS chunk. `cache=True` is for a context around many forwards (the HF engine's
    generate: once per decode step otherwise)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------
# Batches


def _response_index(prompt_lens: list[int], resp_lens: list[int], row_starts: list[int],
                    T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every real response token: the flat index of the hidden state that predicts it
    (`token_pos`) and its slot in the flattened [B, T] outputs (`token_slot`)."""
    pos, slot = [], []
    for i, (p, r, s) in enumerate(zip(prompt_lens, resp_lens, row_starts)):
        pos.append(torch.arange(s + p - 1, s + p - 1 + r))
        slot.append(torch.arange(i * T, i * T + r))
    return torch.cat(pos), torch.cat(slot)


def _response_tensors(prompts: list[list[int]], responses: list[list[int]], row_starts: list[int],
                      T: int) -> dict[str, torch.Tensor]:
    if any(not p for p in prompts):
        raise ValueError("every sample needs a non-empty prompt (its first response token is "
                         "predicted by the prompt's last hidden state)")
    B = len(prompts)
    targets = torch.zeros((B, T), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    for i, r in enumerate(responses):
        targets[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[i, :len(r)] = 1.0
    pos, slot = _response_index([len(p) for p in prompts], [len(r) for r in responses],
                                row_starts, T)
    return {"targets": targets, "response_mask": rmask, "token_pos": pos, "token_slot": slot}


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids, with gather indices for the response tokens.

    Right padding keeps the default position ids (0..len-1) correct for every real token, so no
    position_ids need to be passed and HF's forward matches the engine's. `positions` [B, T] is the
    index (within its row) of the hidden state that predicts each response token.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs)
    T = max(1, max(len(r) for r in responses))
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    out = _response_tensors(prompts, responses, [i * L for i in range(B)], T)
    positions = torch.zeros((B, T), dtype=torch.long)
    positions.view(-1)[out["token_slot"]] = out["token_pos"] % L
    out.update(input_ids=input_ids, attention_mask=attn, positions=positions)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def pack(prompts: list[list[int]], responses: list[list[int]],
         device: torch.device) -> dict[str, torch.Tensor | int]:
    """All prompt+response sequences concatenated into `input_ids` [1, N], no padding.

    `position_ids` [1, N] restart at 0 for each sequence (what makes the attention per sequence),
    `cu_seqlens` [B + 1] (int32) are the sequence boundaries and `max_seqlen` the longest one.
    `positions` [B, T] is the flat index into N of the hidden state that predicts each response
    token; `targets` and `response_mask` [B, T] are exactly those of `collate`.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    lens = [len(s) for s in seqs]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    T = max(1, max(len(r) for r in responses))
    out = _response_tensors(prompts, responses, starts[:-1], T)
    positions = torch.zeros((len(seqs), T), dtype=torch.long)
    positions.view(-1)[out["token_slot"]] = out["token_pos"]
    out.update(input_ids=torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None],
               position_ids=torch.cat([torch.arange(n) for n in lens])[None],
               cu_seqlens=torch.tensor(starts, dtype=torch.int32), positions=positions)
    batch: dict[str, torch.Tensor | int] = {k: v.to(device, non_blocking=True)
                                            for k, v in out.items()}
    batch["max_seqlen"] = max(lens)
    return batch


def token_budget_groups(lengths: Sequence[int], max_tokens: int | None,
                        max_samples: int | None = None) -> list[list[int]]:
    """Indices into `lengths` grouped so each group's tokens sum to at most `max_tokens` (packed
    micro-batches: real tokens, not padded ones), and at most `max_samples` per group.

    First-fit decreasing: few groups of even size, and the longest sample opens the first group,
    so a budget too large for memory fails on the first micro-batch rather than halfway through
    the step. A sample longer than the budget gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    groups: list[list[int]] = []
    room: list[float] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free and (max_samples is None or len(groups[g]) < max_samples):
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append((float("inf") if max_tokens is None else max_tokens) - lengths[i])
    return groups


# ---------------------------------------------------------------------------------------------
# Log-probs


def _chunk_logp_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        inv_temp: float, entropy_grad: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd reference of _ChunkHead; what compile_logit_head compiles."""
    logits = F.linear(hidden, weight).float() * inv_temp
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    # H = lse - sum_v p_v * logit_v; without an entropy bonus no gradient flows through it, so
    # keep it out of the autograd graph (nothing of it saved for backward)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def _log_softmax(hidden: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    # 1/T is folded into the [C, H] input, not the [C, V] logits: one pass fewer, same rounding
    # (under autocast the input is rounded to bf16 either way); log_softmax reads bf16 logits and
    # writes fp32 in one kernel
    scaled = hidden if inv_temp == 1.0 else hidden * inv_temp
    return torch.log_softmax(F.linear(scaled, weight), dim=-1, dtype=torch.float32)


class _ChunkHead(torch.autograd.Function):
    """log p(target) [C] and entropy [C] of one chunk of C tokens, the [C, V] logits recomputed
    in backward rather than saved. Same maths as _chunk_logp_entropy under checkpoint with about
    a third of its passes over [C, V] tensors: no second forward in backward, a closed-form
    gradient (bench_train.py's compile=ref rows time the autograd head)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, inv_temp: float, with_entropy: bool,
                entropy_grad: bool):
        logp_all = _log_softmax(hidden, weight, inv_temp)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            entropy = -logp_all.exp().mul_(logp_all).sum(-1)
        else:
            entropy = logp.new_zeros(logp.shape)
        del logp_all
        ctx.inv_temp, ctx.entropy_grad = inv_temp, with_entropy and entropy_grad
        ctx.save_for_backward(hidden, weight, targets, entropy)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, entropy = ctx.saved_tensors
        logp_all = _log_softmax(hidden, weight, ctx.inv_temp)
        g_logp = g_logp.float().unsqueeze(-1)
        # with z the scaled logits: d logp_t / dz = onehot_t - p and dH / dz = -p (log p + H)
        if ctx.entropy_grad and g_ent is not None:
            p = logp_all.exp()
            coef = logp_all.add_(entropy.unsqueeze(-1)).mul_(-g_ent.float().unsqueeze(-1))
            grad_z = p.mul_(coef.sub_(g_logp))
            del coef, logp_all
        else:
            grad_z = logp_all.exp_().mul_(-g_logp)
        grad_z.scatter_add_(-1, targets.unsqueeze(-1), g_logp)
        # the matmuls' dtype (autocast's, else the weights'), cast once for both; frees fp32
        amp = torch.is_autocast_enabled("cuda")
        grad_z = grad_z.to(torch.get_autocast_dtype("cuda") if amp else weight.dtype)
        scaled = hidden if ctx.inv_temp == 1.0 else hidden * ctx.inv_temp
        # matmuls under the forward's autocast (bf16 on GPU); results back to the masters' dtype
        grad_hidden = (grad_z @ weight).float().mul_(ctx.inv_temp).to(hidden.dtype)
        grad_weight = (grad_z.t() @ scaled).to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


LOGIT_HEADS = ("fused", "autograd", "compiled")
_HEAD_MODE = {"kind": "fused"}
_COMPILED_HEAD: list = []  # made once: switching back and forth must not recompile


def use_logit_head(kind: str) -> None:
    """How token_logprobs computes the LM-head chunks, for every model in this process: "fused"
    (default) _ChunkHead; "autograd" _chunk_logp_entropy under checkpoint (for comparisons);
    "compiled" the same, torch.compiled (GPU; see compile_logit_head)."""
    if kind not in LOGIT_HEADS:
        raise ValueError(f"unknown logit head {kind!r}: one of {LOGIT_HEADS}")
    if kind == "compiled" and not _COMPILED_HEAD:
        raise_recompile_limit()
        _COMPILED_HEAD.append(torch.compile(_chunk_logp_entropy, dynamic=True))
    _HEAD_MODE["kind"] = kind


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
           with_entropy: bool, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _HEAD_MODE["kind"] == "fused":
        return _ChunkHead.apply(hidden, weight, targets, inv_temp, with_entropy, entropy_grad)
    fn = _COMPILED_HEAD[0] if _HEAD_MODE["kind"] == "compiled" else _chunk_logp_entropy
    if torch.is_grad_enabled():
        return checkpoint(fn, hidden, weight, targets, inv_temp, entropy_grad,
                          use_reentrant=False)
    return fn(hidden, weight, targets, inv_temp, entropy_grad)


def _hidden_states(model, batch: dict) -> torch.Tensor:
    """Last hidden states, [B, L, H] (padded batch) or [1, N, H] (packed batch)."""
    if "cu_seqlens" not in batch:
        return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).last_hidden_state
    kwargs = {}
    if model.config._attn_implementation == VARLEN_ATTN:
        # The kernel separates sequences by cu_seqlens: a ready-made (empty) mask mapping makes
        # transformers skip building its dense [N, N] block-diagonal mask.
        mask = {t: None for t in getattr(model.config, "layer_types", None) or ["full_attention"]}
        cu, m = batch["cu_seqlens"], batch["max_seqlen"]
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}
    else:
        # No mask and no cache: transformers detects packing from the position ids restarting at
        # 0 and builds the block-diagonal causal mask itself (with a cache it would not).
        mask = None
        if batch["input_ids"].is_cuda:
            warnings.warn("packed batch without varlen attention: a dense [N, N] mask and no "
                          "flash kernel (call enable_packed_attention(model))", stacklevel=3)
    return model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=mask, use_cache=False, **kwargs).last_hidden_state


def _to_rows(values: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values -> [B, T], zero where there is no response token."""
    flat = values.new_zeros(mask.numel()).index_copy(0, slot, values)
    return flat.view(mask.shape) * mask


def token_logprobs(
    model, batch: dict, temperature: float, with_entropy: bool = False,
    chunk_tokens: int | None = None, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens under the sampling distribution (logits / T).

    `batch` comes from `collate` or `pack`. Only the real response tokens are projected onto the
    vocabulary, `chunk_tokens` (default LOGIT_CHUNK_TOKENS) at a time; under autograd each chunk
    is recomputed in backward, so no more than one chunk of fp32 logits is alive at a time. With
    `with_entropy` the per-token entropy [B, T] comes too; it carries a gradient only with
    `entropy_grad` (an entropy bonus). Padding slots of the outputs are 0.
    """
    chunk_tokens = chunk_tokens or LOGIT_CHUNK_TOKENS
    hidden = _hidden_states(model, batch)
    pos, slot = batch["token_pos"], batch["token_slot"]
    if pos.numel() == 0:
        # nothing to score: one dummy token (zeroed by the mask) keeps backward() working
        pos = slot = pos.new_zeros(1)
    h = hidden.reshape(-1, hidden.shape[-1])[pos]
    targets = batch["targets"].reshape(-1)[slot]
    weight = model.lm_head.weight
    inv_temp = 1.0 / temperature
    logps, ents = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        lp, ent = _chunk(h[s:s + chunk_tokens], weight, targets[s:s + chunk_tokens], inv_temp,
                         with_entropy, entropy_grad)
        logps.append(lp)
        ents.append(ent)
    mask = batch["response_mask"]
    logp = _to_rows(torch.cat(logps), slot, mask)
    entropy = _to_rows(torch.cat(ents), slot, mask) if with_entropy else None
    return logp, entropy


class PolicyLogprobs(torch.nn.Module):
    """An HF causal LM as the update sees it: forward(batch) -> (log-probs, entropy) of
    `token_logprobs`, in one module call.

    Wrappers act on module calls: DDP syncs gradients of what a call used, FSDP2's root unit
    (this module) gathers the embeddings, final norm and LM head for the whole forward while each
    decoder layer gathers its own, and compile traces the call. Reading `lm_head.weight` from
    outside such a call would bypass them. Parameter names under it are `causal_lm.<HF name>`.
    """

    def __init__(self, causal_lm: torch.nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, batch: dict, temperature: float, with_entropy: bool = False,
                entropy_grad: bool = False, chunk_tokens: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(self.causal_lm, batch, temperature, with_entropy=with_entropy,
                              chunk_tokens=chunk_tokens, entropy_grad=entropy_grad)


# ---------------------------------------------------------------------------------------------
# torch.compile (GPU)


def compile_logit_head(enable: bool = True) -> None:
    """Use a compiled _chunk_logp_entropy (under checkpoint) for the LM-head chunks of every
    model in this process, instead of the eager _ChunkHead.

    The head's cost beyond its matmuls is memory traffic over [chunk, vocab] tensors: _ChunkHead
    makes about 4 such passes forward and 4 in backward; inductor fuses the reference's into
    about one each, reading the bf16 logits.
    """
    use_logit_head("compiled" if enable else "fused")
