"""The cost model of the GPU memory plan: the vLLM rollout engine and the HF policy share one GPU.

Pure arithmetic (no torch, no CUDA): from the model's shape and what the run needs at once
(`Workload`), the memory of each part of the two phases of a step for a given choice of
optimizer, gradient checkpointing, vLLM's level-2 sleep, micro-batch size and KV cache. Every
size is in GiB (2**30 bytes) unless its name ends in `_bytes`.

Phases: rollout/eval = vLLM generating while the policy holds its weights and optimizer state
(gradients are freed after each step); train = the policy's forward/backward and optimizer step
while vLLM is awake, or asleep holding only its never-freed overhead. The planned peak is the
larger of the two. The constants below are calibrated on the GPU measurements in
docs/PERFORMANCE.md; re-fit them when new measurements come in (tests/test_memory.py holds them).
The search over the choices is in rlvr/memory_search.py, its notes and the refusal message in
rlvr/memory_notes.py; rlvr/memory_plan.py's `plan_memory` runs the two.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# The constants below are fitted to GPU measurements; what each was fitted to is in
# docs/PERFORMANCE.md, "Memory model calibration".

# --- training side (bf16 autocast, sdpa attention, fp32 residual stream) ----------------------
# Activation bytes per token per layer without checkpointing = 30*hidden + 10*intermediate.
ACT_HIDDEN_BYTES = 30
ACT_INTERMEDIATE_BYTES = 10
# With checkpointing each layer keeps only its fp32 input (4 B x hidden per token); one layer's
# full activations are rebuilt in backward on top.
CKPT_HIDDEN_BYTES = 4
# fp32 [chunk, vocab] tensors alive at once in the loss (logits, log-softmax temporaries, their
# gradient).
LOGITS_FP32_COPIES = 3
# bf16 copies autocast makes of fp32 master weights (its weight cache is off, see
# logprobs.autocast_ctx): without checkpointing autograd saves every one for backward; with it
# only one layer's (rebuilt in backward) and the LM head's (one chunk at a time) are alive.
AUTOCAST_COPY_BYTES = 2
# A frozen copy of the initial policy for a KL term, and vLLM's weights: bf16.
BF16_BYTES = 2
FP32_BYTES = 4

# --- vLLM -------------------------------------------------------------------------------------
KV_BLOCK_TOKENS = 16            # vLLM's default block size: the KV cache comes in these units
KV_DTYPE_BYTES = 2              # bf16 KV cache
VLLM_OVERHEAD_GIB = 1.5         # CUDA graphs (up to batch 512), compile/profiling buffers
SAMPLER_LOGIT_BYTES = 4         # + max_num_seqs x vocab fp32 sampler logits
# What the rollout/eval phase holds above the model in sleep mode (the sleep/wake cycles).
SLEEP_MODE_ROLLOUT_GIB = 1.2
# vLLM's start-up profiling run (a dummy forward of max_num_batched_tokens) leaves its
# activations in torch's cache while the KV cache is allocated in vLLM's own pool; we hand them
# back right after start-up, but they count at that moment: ~11 B per unit of (hidden +
# intermediate) per batched token.
VLLM_PROFILE_TOKENS = 16384
VLLM_PROFILE_BYTES = 11
# Shrinking the KV cache below the eval's need makes vLLM queue sequences (slower, not wrong);
# below this many concurrent sequences of typical length decoding starves the GPU, so refuse.
KV_MIN_CONCURRENT_SEQS = 32

# --- process-wide -----------------------------------------------------------------------------
CUDA_CONTEXT_GIB = 0.6          # CUDA context + cuBLAS workspaces, seen by nvidia-smi, not torch
# The trainer's buffer for weights sent to an engine process (rlvr/engine_process.py).
ENGINE_TRANSFER_GIB = 0.5
# Allocator fragmentation, as a share of what is allocated anew every step (gradients,
# activations, logits, autocast copies); weights and optimizer state are allocated once. This
# assumes allocator hygiene (state allocated up front, empty_cache() between phases).
FRAGMENTATION_SHARE = 0.15
# With vLLM asleep during updates the sleep/wake cycle leaves the allocator's segments split.
SLEEP_FRAGMENTATION_SHARE = 0.33

# Every plan leaves this share of the budget free: a plan whose KV cache was cut to fill the
# budget has no other margin against the model's own error.
MIN_HEADROOM_SHARE = 0.03

# --- choices ----------------------------------------------------------------------------------
DEFAULT_MICRO_BATCH_TOKENS = 8192
# vLLM sleeps during updates from this size on (see memory_search._first).
SLEEP_MIN_PARAMS = 1_000_000_000
MIN_MICRO_BATCH_TOKENS = 1024
# Checkpointing off only when the no-checkpoint activations of a micro-batch are this small a
# share of the budget: recompute costs ~1/3 more update compute, a small price above that.
NO_CKPT_MAX_ACTIVATION_SHARE = 0.10
# Optimizer state offloaded to host memory may take at most this share of the host's RAM: the
# process also holds the checkpoint being loaded, vLLM's CPU buffers, the data and the graders.
HOST_STATE_SHARE = 0.75
# `optim="auto"`: exact first, then the leanest accurate ones by least slowdown (offload last:
# it moves 12 B/param over PCIe every step).
AUTO_OPTIM_ORDER = ("adamw", "adamw_kahan", "adamw_8bit", "adamw_offload", "adamw_kahan_offload")


class PlanError(ValueError):
    """The run cannot fit its memory budget (or the inputs are unusable); a one-line message."""


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2/Llama-style decoder: the numbers that decide its memory."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama (attention_bias false) has none

    @property
    def n_params(self) -> int:
        """Exact parameter count (embeddings, attention with biases, SwiGLU MLP, RMSNorms)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        norms = 2 * self.hidden
        layer = self.hidden * (q + 2 * kv) + bias + q * self.hidden \
            + 3 * self.hidden * self.intermediate + norms
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden + head

    @property
    def matmul_params(self) -> int:
        """Weights autocast casts to bf16: every projection and the LM head (not the embedding
        lookup, norms or biases)."""
        return self.layers * self.layer_matmul_params + self.vocab * self.hidden

    @property
    def layer_matmul_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_DTYPE_BYTES


def model_shape_from_config(config: dict) -> ModelShape:
    """A `ModelShape` from an HF config.json dict (Qwen2/Llama keys; a `text_config` inside is
    used when the top level has none). Raises PlanError naming the first missing key."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size"):
        if key not in config:
            raise PlanError(f"model config.json has no {key!r}: not a Qwen2/Llama-style decoder")
    heads = int(config["num_attention_heads"])
    qwen2 = config.get("model_type") == "qwen2" or any(
        "Qwen2" in a for a in config.get("architectures") or [])
    return ModelShape(
        layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
        intermediate=int(config["intermediate_size"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        vocab=int(config["vocab_size"]),
        # transformers' Qwen2/Llama configs default to untied; untied is also the larger guess
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", qwen2)),
    )


def _qwen(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int, tied: bool,
          max_pos: int = 32768, rope: float = 1e6) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": inter,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": max_pos, "rope_theta": rope,
            "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}


# The shape keys of each model's public config.json, so a dry run works offline for these ids.
KNOWN_SHAPES: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen(24, 896, 4864, 14, 2, 151_936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen(28, 1536, 8960, 12, 2, 151_936, True),
    "Qwen/Qwen2.5-3B-Instruct": _qwen(36, 2048, 11008, 16, 2, 151_936, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen(28, 3584, 18944, 28, 4, 152_064, False),
    "Qwen/Qwen2.5-Math-7B": _qwen(28, 3584, 18944, 28, 4, 152_064, False, 4096, 10_000.0),
}


@dataclass(frozen=True)
class Workload:
    """What one run needs at once (defaults: the seed preset on the 1,250-problem eval set)."""
    rollout_seqs: int = 64            # samples per step
    max_prompt_tokens: int = 1024
    max_tokens: int = 512             # rollout response length
    eval_seqs: int = 5000             # eval problems x eval_n
    eval_max_tokens: int = 512
    max_num_seqs: int = 512           # vLLM's decode concurrency cap
    # eval KV is sized for prompts of this length: vLLM queues what does not fit (slower only)
    typical_prompt_tokens: int = 150
    reference_model: bool = False     # a frozen bf16 copy of the initial policy (KL term)
    logit_chunk_tokens: int = 1024    # rlvr/logprobs.py LOGIT_CHUNK_TOKENS (a test checks)
    # In a torchrun job the plan is one rank's: rollout_seqs and eval_seqs are those of its
    # engine's share; the policy's state is sharded over `fsdp_shards` ranks (FSDP2) or, None,
    # replicated (DDP); one vLLM engine spans `rollout_tp` GPUs (tensor parallel).
    fsdp_shards: int | None = None
    rollout_tp: int = 1
    # Engine processes (rlvr/engine_process.py): `eval_engines` engines that evaluate
    # concurrently, each its share of the problems, each decoding up to `eval_engine_seqs`
    # sequences at once (None: evals run on the rollout engine); and the rollout engine in a
    # process of its own for one-step-off rollouts (it never sleeps).
    eval_engine_seqs: int | None = None
    eval_engines: int = 1
    async_rollout: bool = False

    @property
    def eval_engine_concurrency(self) -> int:
        """Sequences one concurrent eval engine decodes at once: at most its share of the eval."""
        share = -(-self.eval_seqs // max(self.eval_engines, 1))
        return min(self.eval_engine_seqs or 0, share)

    @property
    def max_model_len(self) -> int:
        return self.max_prompt_tokens + max(self.max_tokens, self.eval_max_tokens)

    @property
    def max_train_seq(self) -> int:
        return self.max_prompt_tokens + self.max_tokens


def default_optim_specs() -> dict:
    from rlvr.optimizers import OPTIMIZERS

    return OPTIMIZERS


def param_bytes(spec) -> int:
    """Bytes per weight the optimizer keeps the model in (fp32 masters or bf16)."""
    return spec.param_bytes


def policy_gib(shape: ModelShape, spec, checkpointing: bool,
               fsdp_shards: int | None = None) -> dict[str, float]:
    """The policy's own tensors on one GPU: weights, gradients, GPU optimizer state, and the
    bf16 copies its compute reads: autocast's of fp32 masters, or (FSDP) the gathered units."""
    p = shape.n_params
    if fsdp_shards is not None:
        return {"weights": p * param_bytes(spec) / fsdp_shards / GIB,
                "grads": p * spec.grad_bytes / fsdp_shards / GIB,
                "optimizer": p * spec.state_bytes / fsdp_shards / GIB,
                "autocast": (fsdp_gathered_bytes(shape) + fsdp_reduce_bytes(shape)) / GIB}
    cast = (shape.layer_matmul_params + shape.vocab * shape.hidden if checkpointing
            else shape.matmul_params)
    copies = cast * AUTOCAST_COPY_BYTES if param_bytes(spec) > 2 else 0
    return {"weights": p * param_bytes(spec) / GIB, "grads": p * spec.grad_bytes / GIB,
            "optimizer": p * spec.state_bytes / GIB, "autocast": copies / GIB}


def _fsdp_units(shape: ModelShape) -> tuple[float, float]:
    """Parameters of one decoder layer and of the root unit (embeddings, LM head, final norm)."""
    layer = (shape.n_params - shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
             - shape.hidden) / shape.layers
    return layer, shape.n_params - shape.layers * layer


def fsdp_gathered_bytes(shape: ModelShape) -> float:
    """What FSDP2 holds gathered in bf16 at once: two decoder layers (the one computing and the
    next, prefetched) and the root unit (gathered for the whole forward and backward)."""
    layer, root = _fsdp_units(shape)
    return BF16_BYTES * (2 * layer + root)


def fsdp_reduce_bytes(shape: ModelShape) -> float:
    """Gradients on their way to the reduce-scatter. A unit's are computed in bf16 and copied
    into an fp32 buffer of the whole unit (reduce_dtype fp32, rlvr/fsdp.py) that lives until its
    reduce-scatter ends on its own stream, while the next layer's bf16 gradients are computed;
    the root's (embeddings, LM head) are computed first and reduced last, so they live through
    the whole backward, and get their own fp32 buffer at its end."""
    layer, root = _fsdp_units(shape)
    return max((BF16_BYTES + FP32_BYTES) * layer + BF16_BYTES * root,
               (BF16_BYTES + FP32_BYTES) * root)


def reference_gib(shape: ModelShape, wl: Workload) -> float:
    """A frozen bf16 copy of the initial policy (KL term); sharded like the policy under FSDP."""
    if not wl.reference_model:
        return 0.0
    if wl.fsdp_shards is None:
        return shape.n_params * BF16_BYTES / GIB
    return (shape.n_params * BF16_BYTES / wl.fsdp_shards + fsdp_gathered_bytes(shape)) / GIB


def vllm_weights_gib(shape: ModelShape, wl: Workload) -> float:
    """vLLM's bf16 weights on one GPU (its tensor-parallel share)."""
    return shape.n_params * BF16_BYTES / wl.rollout_tp / GIB


def kv_bytes_per_rank_token(shape: ModelShape, wl: Workload) -> float:
    """KV cache bytes of one token on one GPU: tensor parallelism splits the KV heads (and
    replicates them beyond their count)."""
    return shape.kv_bytes_per_token / min(wl.rollout_tp, shape.kv_heads)


def activation_gib(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    """Activations held for backward by a micro-batch of `tokens` padded tokens."""
    layer = ACT_HIDDEN_BYTES * shape.hidden + ACT_INTERMEDIATE_BYTES * shape.intermediate
    if not checkpointing:
        return shape.layers * layer * tokens / GIB
    return (shape.layers * CKPT_HIDDEN_BYTES * shape.hidden + layer) * tokens / GIB


def logits_gib(shape: ModelShape, chunk_tokens: int) -> float:
    return LOGITS_FP32_COPIES * chunk_tokens * shape.vocab * 4 / GIB


def train_tensors_gib(shape: ModelShape, spec, *, gradient_checkpointing: bool,
                      micro_batch_tokens: int, logit_chunk_tokens: int = 1024) -> float:
    """What torch.cuda.max_memory_allocated sees in a train step without vLLM (bench_train.py)."""
    return (sum(policy_gib(shape, spec, gradient_checkpointing).values())
            + logits_gib(shape, logit_chunk_tokens)
            + activation_gib(shape, micro_batch_tokens, gradient_checkpointing))


def _blocks(tokens: int) -> int:
    return -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def kv_tokens_wanted(wl: Workload) -> int:
    """KV tokens for the rollouts or the eval at full concurrency (the eval: where it runs on
    the rollout engine), and one longest sequence."""
    rollout = min(wl.rollout_seqs, wl.max_num_seqs) * wl.max_train_seq
    evals = (0 if wl.eval_engine_seqs else min(wl.max_num_seqs, wl.eval_seqs)
             * (wl.typical_prompt_tokens + wl.eval_max_tokens))
    return _blocks(max(rollout, evals, wl.max_model_len))


def eval_engine_kv_tokens(wl: Workload) -> int:
    """One concurrent eval engine's KV cache: its decode concurrency at typical length."""
    seq = wl.typical_prompt_tokens + wl.eval_max_tokens
    return _blocks(max(wl.eval_engine_concurrency * seq, wl.max_model_len))


def engine_processes_gib(shape: ModelShape, wl: Workload) -> float:
    """What engine processes add on the card, in every phase (they never sleep): each
    concurrent eval engine's bf16 weights, KV cache, overhead and CUDA context; the CUDA context
    of a rollout engine in its own process (its weights and KV cache are the vLLM rows); and the
    trainer's one transfer buffer for all of them."""
    gib = 0.0
    if wl.eval_engine_seqs:
        gib += wl.eval_engines * (
            (shape.n_params * BF16_BYTES + eval_engine_kv_tokens(wl) * shape.kv_bytes_per_token
             + wl.eval_engine_concurrency * shape.vocab * SAMPLER_LOGIT_BYTES) / GIB
            + VLLM_OVERHEAD_GIB + CUDA_CONTEXT_GIB)
    if wl.async_rollout:
        gib += CUDA_CONTEXT_GIB
    return gib + (ENGINE_TRANSFER_GIB if gib else 0.0)


def kv_tokens_floor(wl: Workload) -> int:
    """The smallest KV cache the plan accepts (see KV_MIN_CONCURRENT_SEQS)."""
    seqs = min(wl.rollout_seqs, wl.max_num_seqs, KV_MIN_CONCURRENT_SEQS)
    return min(kv_tokens_wanted(wl), _blocks(max(wl.max_model_len, seqs * (
        wl.typical_prompt_tokens + max(wl.max_tokens, wl.eval_max_tokens)))))


def vllm_startup_gib(shape: ModelShape) -> float:
    """Activations of vLLM's profiling run, alive only while vLLM starts (see the constants)."""
    return VLLM_PROFILE_TOKENS * VLLM_PROFILE_BYTES * (shape.hidden + shape.intermediate) / GIB


def vllm_overhead_gib(shape: ModelShape, wl: Workload) -> float:
    """vLLM's memory besides weights and KV cache; it stays while vLLM sleeps."""
    return VLLM_OVERHEAD_GIB + wl.max_num_seqs * shape.vocab * SAMPLER_LOGIT_BYTES / GIB
