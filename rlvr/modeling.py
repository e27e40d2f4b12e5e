"""Loading the policy; log-probs of sampled tokens without a [B, T, vocab] fp32 tensor."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Tokens per chunk when projecting hidden states onto the vocabulary: 2,048 x 151,936 logits in fp32
# is 1.2 GB, small next to the model, while a whole 64 x 512 batch would be 20 GB.
LOGIT_CHUNK_TOKENS = 2048


def gguf_cache_dir() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr")) / "gguf"


def resolve_model_dir(model_id: str) -> str:
    """A directory (or hub id) both engines can load; a .gguf file is converted once to bf16 HF.

    vLLM 0.25 has no GGUF loader, and dequantising on every start would cost minutes, so the
    converted model is cached under ~/.cache/rlvr/gguf keyed by the file's path, size and mtime.
    """
    if not model_id.endswith(".gguf"):
        return model_id
    path = Path(model_id).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {model_id}")
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = gguf_cache_dir() / f"{path.stem}-{key}"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[model] converting {path.name} to a bf16 HF directory at {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # dequantize=True: otherwise transformers 5.17 keeps a GGUF quantizer on the model (even with
    # every weight unpacked) and save_pretrained refuses it as "not serializable".
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    # transformers 5.17 reads SmolLM2's GGUF EOS (<|im_end|>, id 2) as <|im_start|> (id 1); the
    # model config keeps the file's own tokenizer.ggml.eos_token_id, so trust that.
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Below this size activations are cheap and recomputing them costs more than the memory saved
# (measured on an H200: 0.5B update 1.29 s with checkpointing at micro-batch 8, 0.73 s without
# at 16); above it, a 3B model without checkpointing outgrows an 80 GB card.
AUTO_CHECKPOINTING_MIN_PARAMS = 1_000_000_000


def load_policy(model_dir: str, device: torch.device, gradient_checkpointing: bool | str):
    """The trainable policy with fp32 master weights.

    bf16 weights stepped at lr ~1e-6 round almost every update away (a 0.02-sized bf16 weight has
    an ulp of ~1.2e-4), so the weights stay fp32 and only the compute runs in bf16 via autocast.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    # token_logprobs computes logits as hidden @ lm_head.weight^T; refuse models that do more
    extra = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
             if getattr(model.config, k, None) not in (None, 1, 1.0)]
    if getattr(model.lm_head, "bias", None) is not None or extra:
        raise ValueError(f"unsupported output head for {model_dir}: lm_head bias or {extra}")
    if gradient_checkpointing == "auto":
        n_params = sum(p.numel() for p in model.parameters())
        gradient_checkpointing = n_params >= AUTO_CHECKPOINTING_MIN_PARAMS
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


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
                        inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(F.linear(hidden, weight).float() * inv_temp, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def token_logprobs(
    model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False,
    chunk_tokens: int = LOGIT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens under the sampling distribution (logits / T).

    `batch` comes from `collate`: right-padded `input_ids`/`attention_mask` [B, L] and, for the
    response tokens, `positions` [B, T] (index of the hidden state that predicts each token),
    `targets` [B, T] and `response_mask` [B, T]. Only the response positions are projected onto
    the vocabulary, in chunks; under autograd each chunk is recomputed in backward, so no more than
    one chunk of fp32 logits is alive at a time. Entropy (no grad) is returned when asked.
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
        if with_entropy:
            lp, ent = _chunk_logp_entropy(hc, weight, tc, inv_temp)
            ents.append(ent)
        elif torch.is_grad_enabled():
            lp = checkpoint(_chunk_logp, hc, weight, tc, inv_temp, use_reentrant=False)
        else:
            lp = _chunk_logp(hc, weight, tc, inv_temp)
        logps.append(lp)
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
