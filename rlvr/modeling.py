"""Loading the policy and its tokenizer (hub id, local directory or .gguf file)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

# How long the hub gets to answer before a model that is not cached counts as unreachable;
# transformers itself would retry for about a minute and print every attempt.
HUB_PROBE_TIMEOUT_S = 3.0
_LOCAL_HINT = "or pass --model_id a local model directory or a .gguf file"


class ModelSourceError(ValueError):
    """The model id names nothing that can be loaded; the message is one line."""


def _looks_local(model_id: str) -> bool:
    return (model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..")
            or model_id.endswith(".gguf") or os.path.exists(model_id))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    truthy = {"1", "ON", "YES", "TRUE"}
    return constants.HF_HUB_OFFLINE or any(  # the environment as it is now, not at import
        os.environ.get(k, "").upper() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_hub(model_id: str, timeout_s: float) -> int | str:
    """HTTP status of the model's config.json on the hub, or why the hub gave no answer.

    In a daemon thread with a deadline: the client's timeouts do not cover name resolution.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    answer: list[int | str] = []

    def probe() -> None:
        try:
            url = f"{constants.ENDPOINT}/{model_id}/resolve/main/config.json"
            answer.append(get_session().head(url, headers=build_hf_headers(), timeout=timeout_s,
                                             follow_redirects=False).status_code)
        except Exception as e:
            answer.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    thread = threading.Thread(target=probe, daemon=True, name="rlvr-hub-probe")
    thread.start()
    thread.join(timeout_s + 0.5)
    return answer[0] if answer else f"no answer in {timeout_s:g} s"


def check_model_source(model_id: str) -> None:
    """Fail in seconds, in one line, when `model_id` cannot be loaded; loads nothing.

    Local paths (absolute, ./ ../ ~, a .gguf, or anything that exists) must be a .gguf file or a
    directory with config.json. A hub id passes when its config.json is in the local Hugging
    Face cache (offline too); otherwise the hub must answer a short probe, which HF_HUB_OFFLINE=1
    rules out. Called before anything heavy, instead of letting the loaders retry for a minute.
    """
    if _looks_local(model_id):
        path = Path(model_id).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model path {model_id} does not exist; pass an existing "
                                   "model directory, a .gguf file or a hub id (org/name)")
        if model_id.endswith(".gguf"):
            if not path.is_file():
                raise ModelSourceError(f"{model_id} is not a .gguf file; pass the file itself")
        elif not (path / "config.json").is_file():
            raise ModelSourceError(f"{model_id} is not a Hugging Face model directory (no "
                                   "config.json); pass the directory that holds config.json")
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return  # cached: loads offline
    except HFValidationError:
        raise ModelSourceError(f"{model_id} is neither an existing path nor a valid hub id "
                               "(org/name); check its spelling") from None
    if _hub_offline():
        raise ModelSourceError(f"{model_id} is not in the local Hugging Face cache and "
                               f"HF_HUB_OFFLINE is set: unset it, {_LOCAL_HINT}")
    status = _probe_hub(model_id, HUB_PROBE_TIMEOUT_S)
    if isinstance(status, str):
        raise ModelSourceError(f"{model_id} is not in the local Hugging Face cache and the hub "
                               f"({constants.ENDPOINT}) cannot be reached ({status}): connect "
                               f"to it, {_LOCAL_HINT}")
    if status == 404:
        raise ModelSourceError(f"{model_id}: no such local path, and no such model on the hub "
                               f"({constants.ENDPOINT}); check its spelling")
    if status in (401, 403):
        raise ModelSourceError(f"the hub refuses {model_id} ({status}): not found, or private "
                               "or gated (log in with `hf auth login` or set HF_TOKEN)")
    # anything else (a redirect, 5xx): reachable; the loader makes the real request


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


def load_policy(model_dir: str, device: torch.device, gradient_checkpointing: bool, *,
                dtype: torch.dtype = torch.float32):
    """The trainable policy, its weights loaded directly in `dtype` (fp32 master weights unless
    the optimizer keeps its own accurate copy).

    Plain bf16 weights stepped at lr ~1e-6 round almost every update away (a 0.02-sized bf16
    weight has an ulp of ~1.2e-4), so by default the weights stay fp32 and only the compute runs
    in bf16 via autocast; bf16 is for an optimizer that makes up for it (Kahan summation,
    stochastic rounding) and halves the weights' memory.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    # token_logprobs computes logits as hidden @ lm_head.weight^T; refuse models that do more
    extra = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
             if getattr(model.config, k, None) not in (None, 1, 1.0)]
    if getattr(model.lm_head, "bias", None) is not None or extra:
        raise ValueError(f"unsupported output head for {model_dir}: lm_head bias or {extra}")
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
