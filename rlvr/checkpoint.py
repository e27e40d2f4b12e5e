"""Checkpoints: everything needed to continue a run exactly where it stopped, and the final model.

A checkpoint directory `checkpoints/step_<n>/` holds
- `policy.safetensors`: the policy's weights in the dtype it trains in (fp32 masters, or bf16 for
  adamw_kahan and adamw_kahan_offload), HF key names, a tied weight stored once (its alias in the
  header's metadata);
- `optimizer.safetensors` + `optimizer_meta.pt`: the optimizer's tensors, and the rest of its
  state_dict (hyperparameters, structure) with each tensor replaced by its name in the file (an
  offload option's state is written from host RAM; on resume its host copies of the weights are
  refreshed from the loaded model);
- `state.pt`: step, RNG states, data position, written last: its presence marks a complete one.

Tensors are streamed to disk one at a time (no host copy of the whole state, no pickling, no
CRC pass over tens of GB). Each checkpoint is written to a temporary directory and renamed, and
the previous one is removed only after the new one is complete, so a crash while saving never
leaves a run without a usable checkpoint. A full disk is a one-line CheckpointError.

In a torchrun job saving and the final model are collective (every rank calls them). Replicated
(DDP) state is the same on every rank, so rank 0 alone writes the one-process format above: one
writer, and a checkpoint that resumes at any world size and exports like any other. Sharded
(FSDP2) state goes through torch.distributed.checkpoint instead (`dcp/` in place of the two
safetensors files): every rank writes its shards, and a resume at another world size reshards
on load. The final model is one HF directory either way, gathered one tensor at a time.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlvr import dist, tensor_io
from rlvr.fsdp import is_sharded
from rlvr.optimizers import OPTIMIZERS

CKPT_DIRNAME = "checkpoints"
POLICY, OPTIM, OPTIM_META, STATE = ("policy.safetensors", "optimizer.safetensors",
                                    "optimizer_meta.pt", "state.pt")
SHARDED = "dcp"  # torch.distributed.checkpoint's directory: a sharded (FSDP2) run's state
FINAL_WEIGHTS = "model.safetensors"
_ALIASES = "rlvr_aliases"
# state.pt, optimizer_meta.pt, headers, config and tokenizer files (a Qwen tokenizer is ~11 MB)
_SMALL_FILES_BYTES = 32 << 20


class CheckpointError(OSError):
    """A checkpoint or final model could not be written because the disk is full.

    An OSError (what a full disk is), so callers that catch OSError already report it."""


def rng_state() -> dict:
    """This process's RNG states (rank 0's in a job: every rank seeds alike, and nothing a step
    computes draws from them per rank; rollouts are seeded per request). CUDA: this process's
    own GPU only; the states of every visible GPU would open a context on each of them."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # a list of one per GPU where get_rng_state_all wrote it
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list) else cuda)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIRNAME
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if (p / STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def checkpoint_disk_bytes(n_params: int, optim_name: str) -> dict[str, int]:
    """Disk a run needs, in bytes, for `n_params` parameters (a tied weight counted once).

    checkpoint: one resumable checkpoint (weights in the training dtype + optimizer state).
    final_model: the bf16 HF model. For the bf16 options (adamw_kahan, adamw_kahan_offload) it is
    a hard link to the last checkpoint's weights (when save_final_policy is given that
    checkpoint), so it adds nothing.
    peak: at the end of a run (or any save): the previous checkpoint is removed only once the
    new one is complete, so two checkpoints and the final model exist for a moment.
    """
    spec = OPTIMIZERS[optim_name]
    ckpt = int(n_params * (spec.param_bytes + spec.saved_state_bytes)) + _SMALL_FILES_BYTES
    final = 0 if spec.param_dtype == torch.bfloat16 else 2 * n_params + _SMALL_FILES_BYTES
    return {"checkpoint": ckpt, "final_model": final, "peak": 2 * ckpt + final}


# ---- save / load ------------------------------------------------------------------------------

def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save on a full disk: "[enforce fail at inline_container.cc:672] . unexpected pos"
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e)
                                            or "No space left" in str(e))


def _write_dir(final: Path, need: int, what: str, write: Callable[[Path], None],
               every_rank: Callable[[Path], None] | None = None) -> Path:
    """Write into a temporary sibling of `final` and rename it into place; on any failure
    remove the temporary directory, and name a full disk as such. Rank 0 makes, fills (`write`)
    and renames the directory; `every_rank(tmp)`, when given, runs on every rank of the job
    first (all call this then), once the directory exists."""
    main = dist.is_main()
    tmp = final.with_name(f".{final.name}.tmp")
    free = 0

    def full(cause: BaseException | None) -> CheckpointError:
        err = CheckpointError(f"disk is full: {what} needs {need / 1e9:.2f} GB ({need} bytes) "
                              f"under {final.parent}, {free / 1e9:.2f} GB free before writing")
        err.errno = errno.ENOSPC
        err.__cause__ = cause
        return err

    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(final.parent).free
        if free < need:
            raise full(None)
        tmp.mkdir()
    try:
        if every_rank is not None:
            dist.barrier()  # the directory exists before any rank writes into it
            every_rank(tmp)
        if main:
            write(tmp)
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint left behind
        if _disk_full(e):
            raise full(e) from e
        raise
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def save_checkpoint(run_dir: Path, step: int, policy: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict) -> Path:
    """checkpoints/step_<step>/ of `policy` (the HF model) and `optimizer`, with `extra` in
    state.pt; the previous checkpoint removed once it is complete. Collective in a torchrun job."""
    root = Path(run_dir) / CKPT_DIRNAME
    final = root / f"step_{step}"
    state = {"step": step, "rng": rng_state(), **extra}
    if is_sharded(policy):
        _save_sharded(final, step, policy, optimizer, state)
    elif dist.is_main():  # [dist] replicated state: rank 0 writes it (see the module doc)
        _save_replicated(final, step, policy, optimizer, state)
    dist.barrier()  # complete before any rank goes on (to the next step, or to exit)
    if dist.is_main():
        for old in root.glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _save_replicated(final: Path, step: int, policy: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, state: dict) -> None:
    weights, aliases = tensor_io.unique_tensors(policy.state_dict())
    opt_tensors: dict[str, torch.Tensor] = {}
    skeleton = tensor_io.flatten_state(optimizer.state_dict(), "opt", opt_tensors)
    need = tensor_io.nbytes(weights) + tensor_io.nbytes(opt_tensors) + _SMALL_FILES_BYTES

    def write(tmp: Path) -> None:
        tensor_io.write_safetensors(tmp / POLICY, weights,
                                    {"format": "pt", _ALIASES: json.dumps(aliases)})
        tensor_io.write_safetensors(tmp / OPTIM, opt_tensors, {"format": "pt"})
        torch.save(skeleton, tmp / OPTIM_META)
        torch.save(state, tmp / STATE)  # last: complete

    _write_dir(final, need, f"the step-{step} checkpoint", write)


def _save_sharded(final: Path, step: int, policy: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    # of all ranks: a DTensor counts whole
    need = tensor_io.tree_bytes(model_sd) + tensor_io.tree_bytes(optim_sd) + _SMALL_FILES_BYTES

    def shards(tmp: Path) -> None:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED))

    _write_dir(final, need, f"the step-{step} checkpoint",
               lambda tmp: torch.save(state, tmp / STATE), every_rank=shards)


def load_policy_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a checkpoint directory (every state_dict key, tied ones included),
    on the CPU, in the dtype they were trained in; memory-mapped (one-process format), so cheap
    to call. A sharded checkpoint is read whole into this process."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / SHARDED).is_dir():
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            return _load_state_dict_from_keys({"model"},
                                              checkpoint_id=str(ckpt_dir / SHARDED))["model"]
    tensors, meta = tensor_io.load_safetensors(ckpt_dir / POLICY)
    for alias, target in json.loads(meta.get(_ALIASES, "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def load_checkpoint(path: Path, policy: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint into the live policy and optimizer (every rank, whatever world size
    wrote it); returns its state.pt."""
    path = Path(path)
    if (path / SHARDED).is_dir():
        _load_sharded(path / SHARDED, policy, optimizer)
    else:
        # From memory-mapped host tensors, copied into the live ones: no second copy of the
        # weights or of the optimizer state sits on the GPU next to vLLM.
        policy.load_state_dict(load_policy_state(path))
        tensors, _ = tensor_io.load_safetensors(path / OPTIM)
        skeleton = torch.load(path / OPTIM_META, weights_only=True)
        tensor_io.load_optimizer_state(optimizer, tensor_io.unflatten_state(skeleton, tensors))
    state = torch.load(path / STATE, weights_only=False)
    set_rng_state(state["rng"])
    return state


def _load_sharded(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Into the live (sharded) state: DCP reads each rank's part of every tensor, so the job may
    have another world size than the one that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():  # alone: "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=sd["model"],
                   optim_state_dict=sd["optimizer"])


def _same_bf16_layout(path: Path, weights: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's weights file holds exactly these tensors' names, shapes and bf16
    dtype (what the final model would write), so it can be linked instead."""
    from safetensors import safe_open

    if not path.exists() or any(t.is_floating_point() and t.dtype != torch.bfloat16
                                for t in weights.values()):
        return False
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != set(weights):
            return False
        return all(f.get_slice(k).get_shape() == list(t.shape)
                   and f.get_slice(k).get_dtype() == tensor_io.ST_DTYPES[t.dtype]
                   for k, t in weights.items())


def save_final_policy(run_dir: Path, policy: torch.nn.Module, tokenizer,
                      checkpoint: Path | None = None) -> Path:
    """The trained policy in HF format (bf16, as released checkpoints are) to load anywhere.

    Weights are cast to bf16 one tensor at a time on their device as they are written (sharded:
    gathered one at a time, every rank taking part, rank 0 writing). If the policy already trains
    in bf16 and `checkpoint` is the checkpoint just saved of this same policy, its weights file
    is hard-linked instead of written again. Collective in a torchrun job.
    """
    out = Path(run_dir) / "final_model"
    sharded = is_sharded(policy)
    if not (sharded or dist.is_main()):  # [dist] replicated: rank 0 has it all
        dist.barrier()
        return out
    weights, _ = tensor_io.unique_tensors(policy.state_dict())
    link = Path(checkpoint) / POLICY if checkpoint is not None else None
    if link is not None and not _same_bf16_layout(link, weights):
        link = None
    need = _SMALL_FILES_BYTES + (0 if link else tensor_io.nbytes(weights, torch.bfloat16))

    def tensors(tmp: Path) -> None:
        tensor_io.write_safetensors(tmp / FINAL_WEIGHTS if dist.is_main() else None, weights,
                           {"format": "pt"}, cast=torch.bfloat16)

    def write(tmp: Path) -> None:
        if link is not None:
            try:
                os.link(link, tmp / FINAL_WEIGHTS)
            except OSError:  # another file system, or links not supported
                shutil.copyfile(link, tmp / FINAL_WEIGHTS)
        elif not sharded:
            tensors(tmp)
        config = copy.deepcopy(policy.config)
        config.dtype = torch.bfloat16  # else from_pretrained would load the bf16 file as fp32
        config.architectures = [type(policy).__name__]
        config.save_pretrained(tmp)
        if getattr(policy, "generation_config", None) is not None:
            policy.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_dir(out, need, "the final model", write, every_rank=tensors if sharded else None)
    dist.barrier()
    return out
