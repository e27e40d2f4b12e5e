"""The ranks of a torchrun job and the few collective steps the loop takes; identity when alone.

torchrun (torch.distributed elastic) starts one process per GPU and puts RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE in each one's environment; `init` joins them into one process group
(NCCL on GPUs, gloo on CPU). Every other function here also works in a plain `python` process,
where the world is one rank and each is the identity, so the loop has one code path. The places
that call this module are the only rank-aware ones: the prompt split of a step, the global
mini-batch schedule and its statistics, the eval split, the checkpoint writes and rank 0's logs.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")
# Longer than any single step's compute between two collectives (an eval chunk, a checkpoint);
# a rank that dies is caught by torchrun's agent within seconds, not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The world torchrun describes in the environment (one rank without it); reads nothing else,
    so flags can be checked against it before torch initialises anything."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                 int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))


def under_torchrun() -> bool:
    return tdist.is_torchelastic_launched()


def init(device_type: str) -> World:
    """Join the job's process group (once per process; left at exit). Ranks other than 0
    print nothing to stdout."""
    w = launched()
    if not under_torchrun() or tdist.is_initialized():
        return world()
    if device_type == "cuda":
        torch.cuda.set_device(w.local_rank)
        tdist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT,
                                 device_id=torch.device("cuda", w.local_rank))
    else:
        tdist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    atexit.register(close)
    if not w.main:  # rank 0 alone prints progress; errors still reach stderr from every rank
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return w


def world() -> World:
    if not tdist.is_initialized():
        return World()
    env = launched()
    return World(tdist.get_rank(), tdist.get_world_size(), env.local_rank, env.local_size)


def is_main() -> bool:
    return world().main


def shard(items: Sequence[T], parts: int | None = None, index: int | None = None) -> list[T]:
    """Part `index` of `parts` contiguous parts of `items` (default: this rank's of the world).
    The parts' sizes differ by at most one, earlier parts taking the extra items; a step's
    prompts are split evenly (whole groups of rollouts, see config), an eval set need not be."""
    w = world()
    parts, index = parts or w.size, w.rank if index is None else index
    base, extra = divmod(len(items), parts)
    start = index * base + min(index, extra)
    return list(items[start:start + base + (index < extra)])


def _device() -> torch.device:
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all) stacked along dim 0 in rank order, on t's device."""
    if world().size == 1:
        return t
    local = t.to(_device())
    parts = [torch.empty_like(local) for _ in range(world().size)]
    tdist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world().size == 1:
        return t
    out = t.to(_device())
    tdist.all_reduce(out)
    return out.to(t.device)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's picklable `obj`, in rank order (records of an eval, small statistics)."""
    if world().size == 1:
        return [obj]
    out: list = [None] * world().size
    tdist.all_gather_object(out, obj)
    return out


def tensor_parallel_group(size: int):
    """The process group of this rank's `size` consecutive ranks, or None for size 1. Every rank
    must call it, in the same order relative to other group creations (a collective)."""
    if size == 1:
        return None
    ranks = [list(range(i, i + size)) for i in range(0, world().size, size)]
    group, _ = tdist.new_subgroups_by_enumeration(ranks)
    return group


def engines(tensor_parallel: int) -> tuple[int, int]:
    """(rollout engines in the job, this rank's): one per `tensor_parallel` consecutive ranks."""
    w = world()
    return w.size // tensor_parallel, w.rank // tensor_parallel


def pool_in_group(prompts_and_seeds: tuple[list, list | None],
                  group) -> tuple[list, list | None, int]:
    """The prompts (and per-prompt seeds) of every rank of `group`, in group-rank order, and
    where this rank's own start in the pool. Ranks that asked alike (an eval part shared by the
    group) pool nothing: each gets the whole answer."""
    parts: list = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(parts, prompts_and_seeds, group=group)
    return pool(parts, tdist.get_rank(group))


def pool(parts: list[tuple[list, list | None]], me: int) -> tuple[list, list | None, int]:
    """pool_in_group's answer from the group's (prompts, seeds) parts, for group rank `me`."""
    if all(p == parts[0] for p in parts):
        return *parts[0], 0
    offset = sum(len(p) for p, _ in parts[:me])
    seeds = None if any(s is None for _, s in parts) else [x for _, s in parts for x in s]
    return [x for p, _ in parts for x in p], seeds, offset


def barrier() -> None:
    if world().size > 1:
        tdist.barrier()


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` in DDP under torchrun (weights replicated, gradients all-reduced in backward),
    as it is in a plain process. Its buffers (rotary tables) are the same on every rank, so none
    is broadcast: a broadcast per forward would make the ranks' forward counts have to agree."""
    if not tdist.is_initialized():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch 2.13 renamed broadcast_buffers (which it deprecates) to forward_sync_buffers
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else "broadcast_buffers")
    return DDP(module, device_ids=[device.index or 0] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, **{no_sync: False})


class _Silent:
    """Takes any call and does nothing: what ranks other than 0 hold instead of a logger."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def __enter__(self) -> _Silent:  # what stands in for rank 0's run-directory claim
        return self

    def __exit__(self, *exc) -> None:
        pass


def on_main(make: Callable[[], T]) -> T:
    """`make()` on rank 0; elsewhere an object on which every method call does nothing."""
    return make() if is_main() else _Silent()  # type: ignore[return-value]


def close() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
