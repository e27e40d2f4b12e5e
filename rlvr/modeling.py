"""Loading the policy and its tokenizer (hub id, local directory or .gguf file)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


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
