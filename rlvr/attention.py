"""Attention for packed (padding-free) micro-batches, and compiled decoder layers.

transformers runs any attention function registered under a name; ours sends packed batches (those
that carry `cu_seq_lens_q`) to torch's flash varlen kernel and everything else to plain sdpa, so
padded batches and generation are untouched. rlvr/logprobs.py builds the packed batches.
"""

from __future__ import annotations

import inspect

import torch

VARLEN_ATTN = "rlvr_varlen"  # our name in transformers' AttentionInterface


def _load_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# varlen_attn's keywords changed between torch releases (is_causal -> window_size; scale and
# enable_gqa added), so the call is built from its signature.
_VARLEN, _VARLEN_PARAMS = _load_varlen()


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence: q [N, Hq, D], k and v [N, Hkv, D]."""
    dtype = q.dtype
    if q.is_cuda:  # the flash kernel takes bf16/fp16 only and, as a custom op, ignores autocast
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        if dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"varlen attention needs bf16/fp16 (autocast), got {dtype}")
    kw = {}
    if "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        # Older varlen_attn documents K/V with as many heads as Q: repeat them (HF's repeat_kv
        # order, query head h reads kv head h // n_rep) rather than rely on undocumented GQA.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in _VARLEN_PARAMS:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in _VARLEN_PARAMS:
        kw["scale"] = scale
    elif abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:
        raise RuntimeError("this torch's varlen_attn has no scale argument; need 1/sqrt(head_dim)")
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    return _VARLEN(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def _packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs):
    """transformers attention function: varlen for packed batches (those that carry
    cu_seq_lens_q), plain sdpa for everything else (padded batches, generation)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1 or sliding_window is not None or dropout:
        raise NotImplementedError("packed attention: one row, no sliding window, no dropout")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # HF hands over [1, H, N, D]; the kernel wants [N, H, D] and HF wants [1, N, H, D] back
    out = _flash_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1),
                        value[0].transpose(0, 1), cu, kwargs["max_length_q"], scale)
    return out.unsqueeze(0), None


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _VARLEN is not None


def enable_packed_attention(model, impl: str = "auto") -> str:
    """Choose how packed batches attend; returns the implementation now active.

    "varlen": torch's flash varlen kernel for packed batches (CUDA, torch >= 2.9), sdpa for all
    other batches; "sdpa": transformers' dense block-diagonal mask (N^2 bytes, no flash kernel:
    for CPU and tests). "auto" takes varlen where it is available and the model has only full
    attention layers. Padded batches and generation behave as with plain sdpa either way.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if impl == "auto":
        device = next(model.parameters()).device
        full = all(t == "full_attention" for t in getattr(model.config, "layer_types", None) or [])
        impl = "varlen" if varlen_available(device) and full else "sdpa"
    if impl == "varlen":
        AttentionInterface.register(VARLEN_ATTN, _packed_attention)
        # padded batches get sdpa's own mask under our name (packed ones skip mask building)
        AttentionMaskInterface.register(VARLEN_ATTN, sdpa_mask)
        model.set_attn_implementation(VARLEN_ATTN)
    elif impl == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        raise ValueError(f"unknown packed attention {impl!r}: auto, varlen or sdpa")
    return impl


# ---------------------------------------------------------------------------------------------
# torch.compile (GPU)


def raise_recompile_limit(n: int = 64) -> None:
    # grad/no-grad, train/eval, packed/padded each add a graph; the default limit (8) would
    # silently fall back to eager part-way through a run
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), n))


def compile_decoder_layers(model, enable: bool = True) -> int:
    """torch.compile each decoder layer in place (regional compilation); returns how many.

    The layers share one code path, so one graph serves all of them. Shapes are dynamic from the
    first call: the packed length N (and the padded [B, L]) change every micro-batch, and a static
    graph would recompile for each. Module.compile keeps parameter names (state_dict, weight sync
    and checkpoints unchanged), and gradient checkpointing wraps the compiled call, so the
    recompute in backward runs the compiled forward. `enable=False` restores eager.
    """
    raise_recompile_limit()
    layers = model.model.layers
    for layer in layers:
        compiled = getattr(layer, "_compiled_call_impl", None) is not None  # Module.compile's
        if enable and not compiled:
            layer.compile(dynamic=True)
        elif not enable:
            layer._compiled_call_impl = None
    return len(layers)
