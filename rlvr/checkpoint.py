"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the fp32 policy, the optimizer, the step, every RNG state and the data position.
It is written to a temporary directory and renamed, and the previous one is removed only after the
new one is complete, so a crash while saving never leaves a run without a usable checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CKPT_DIRNAME = "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIRNAME
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if (p / "state.pt").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def save_checkpoint(run_dir: Path, step: int, policy: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict) -> Path:
    root = Path(run_dir) / CKPT_DIRNAME
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(policy.state_dict(), tmp / "policy.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        # state.pt is written last: its presence marks a complete checkpoint
        torch.save({"step": step, "rng": rng_state(), **extra}, tmp / "state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint left behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, policy: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    # via the CPU: load_state_dict copies into the live tensors, so no second copy of the weights
    # (12 GB at 3B) sits on the GPU next to vLLM
    policy.load_state_dict(torch.load(path / "policy.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    state = torch.load(path / "state.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def save_final_policy(run_dir: Path, policy: torch.nn.Module, tokenizer) -> Path:
    """The trained policy in HF format (bf16, as released checkpoints are) to load anywhere."""
    out = Path(run_dir) / "final_model"
    tmp = Path(run_dir) / ".final_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict={k: v.to(torch.bfloat16)
                                            for k, v in policy.state_dict().items()})
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
