"""FSDP2 for the policy (`--fsdp`): sharded units, full tensors for the sync and the final model.

Each decoder layer is one `fully_shard` unit and the update's module (logprobs.PolicyLogprobs)
the root, whose unit holds the rest: embeddings, final norm and LM head, which a tied model keeps
as one parameter (tied weights must stay in one unit, and the model is never materialised from
meta with `to_empty`, which would untie them). The masters are fp32 shards; on a GPU each unit is
gathered in bf16 for compute and its gradients reduce-scattered in fp32 (MixedPrecisionPolicy),
so a rank holds its shard of weights, gradients and AdamW state plus about one gathered layer.

Only exact AdamW (`--optim adamw`, torch's, whose state follows the DTensor shards) runs sharded:
the Kahan, 8-bit and offload options keep state of their own that is not sharded with them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

from rlvr.logprobs import PolicyLogprobs


def _mp_policy(device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    # CPU (tests): fp32 throughout, as the unsharded path computes there
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard(causal_lm: torch.nn.Module, device: torch.device,
          dtype: torch.dtype = torch.float32) -> PolicyLogprobs:
    """`causal_lm` (loaded on the CPU) sharded over every rank of the job, in place, its shards
    cast to `dtype` (fp32 masters for training; bf16 for a frozen reference) and moved to
    `device` one unit at a time: no rank ever holds the whole model in `dtype` on either side.
    Returns the root unit, the module the update calls."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlvr import dist

    mesh = init_device_mesh(device.type, (dist.world().size,))
    mp = _mp_policy(device)
    layers = causal_lm.model.layers
    for layer in layers:
        layer.to(dtype)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    in_layers = {id(p) for p in layers.parameters()}
    for p in causal_lm.parameters():  # the root unit's: cast in place, so a tie stays a tie
        if id(p) not in in_layers:
            p.data = p.data.to(dtype)
    root = PolicyLogprobs(causal_lm)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensors(causal_lm: torch.nn.Module, dtype: torch.dtype | None = torch.bfloat16
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, whole tensor in `dtype`, None: as trained) of each parameter, one at a time,
    for the rollout engine's load_weights. A sharded parameter's shard is cast first and then
    gathered: a collective, issued in the same (named_parameters) order on every rank, so every
    rank must consume the whole iterator or none of it; one parameter's copy is alive at a
    time."""
    for name, p in causal_lm.named_parameters():
        t = p.detach() if dtype is None else p.detach().to(dtype)
        yield name, t.full_tensor() if isinstance(t, DTensor) else t

