"""Checkpoints: exact resume for every optimizer option, the final HF model, disk sizes, and a
full disk reported as such with no partial checkpoint left behind."""

from __future__ import annotations

import errno
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_optimizers import CPU_OPTIONS, WD, Net, fixed_grads, set_grads

from rlvr import checkpoint as C
from rlvr import tensor_io
from rlvr.checkpoint import (
    CheckpointError,
    checkpoint_disk_bytes,
    latest_checkpoint,
    load_checkpoint,
    load_policy_state,
    save_checkpoint,
    save_final_policy,
)
from rlvr.modeling import load_policy, load_tokenizer
from rlvr.optimizers import make_optimizer

EXTRA = {"sampler": {"epoch": 0, "pos": 3}, "eval_history": [(0, {"pass@1": 0.5})]}


def steps(net, opt, first: int, n: int) -> None:
    for t in range(first, first + n):
        set_grads(net, fixed_grads(net, t, scale=1.0))
        opt.step()


def draw() -> list[float]:
    return [random.random(), float(np.random.rand()), torch.rand(1).item()]


def optimizer_tensors(opt) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tensor_io.flatten_state(opt.state_dict(), "o", d := {})
    out += d.values()
    return out


@pytest.mark.parametrize("name", CPU_OPTIONS)
def test_save_load_step_equals_an_uninterrupted_run(tmp_path, name):
    lr, wd = 1e-3, WD  # the quality test's wd: torchao compiles its step per float value
    torch.manual_seed(5)
    a = Net()
    opt_a = make_optimizer(a, lr, wd, name)
    steps(a, opt_a, 0, 2)
    ckpt = save_checkpoint(tmp_path, 2, a, opt_a, EXTRA)
    expected_draws = draw()
    steps(a, opt_a, 2, 3)

    b = Net(seed=9)  # other weights: everything must come from the checkpoint
    opt_b = make_optimizer(b, lr, wd, name)
    state = load_checkpoint(ckpt, b, opt_b)
    assert state["step"] == 2 and state["sampler"] == EXTRA["sampler"]
    assert draw() == expected_draws  # RNG streams continue where they were
    steps(b, opt_b, 2, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for s, t in zip(optimizer_tensors(opt_a), optimizer_tensors(opt_b)):
        assert torch.equal(s, t), name


@pytest.mark.parametrize("name", CPU_OPTIONS)
def test_load_copies_into_the_preallocated_state(tmp_path, name):
    net = Net()
    opt = make_optimizer(net, 1e-3, WD, name)
    steps(net, opt, 0, 1)
    ckpt = save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    live = [t.data_ptr() for t in optimizer_tensors(opt)]
    load_checkpoint(ckpt, net, opt)
    assert [t.data_ptr() for t in optimizer_tensors(opt)] == live


def test_only_the_latest_complete_checkpoint_is_kept(tmp_path):
    net = Net(n_mats=1, n_norms=1)
    opt = make_optimizer(net, 1e-3, 0.0)
    save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    (tmp_path / "checkpoints" / ".step_5.tmp").mkdir()  # a crash mid-save of step 5
    save_checkpoint(tmp_path, 2, net, opt, EXTRA)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step_5.tmp", "step_2"]
    assert latest_checkpoint(tmp_path) == root / "step_2"


@pytest.mark.parametrize("name", CPU_OPTIONS)
def test_disk_bytes_match_what_is_written(tmp_path, name):
    net = Net()
    opt = make_optimizer(net, 1e-3, WD, name)
    ckpt = save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    written = sum(f.stat().st_size for f in ckpt.iterdir())
    n = sum(p.numel() for p in net.parameters())
    # the formula counts fp32 moments of small tensors (here 2 norms) as 8-bit ones, and
    # reserves 32 MiB for small files; the tensor bytes must agree to within those
    predicted = checkpoint_disk_bytes(n, name)["checkpoint"] - C._SMALL_FILES_BYTES
    small = sum(p.numel() for p in net.parameters() if p.numel() < 4096)
    assert 0 <= written - predicted <= 8 * small + 64 * 1024, (written, predicted)


def test_disk_bytes_per_parameter():
    n = 3_085_938_688  # Qwen2.5-3B
    small = C._SMALL_FILES_BYTES

    def per_param(name: str, key: str) -> float:
        b = checkpoint_disk_bytes(n, name)[key]
        return (b - small) / n if b else 0.0

    assert per_param("adamw", "checkpoint") == 12  # fp32 weights + two fp32 moments
    assert per_param("adamw", "final_model") == 2
    assert per_param("adamw_kahan", "checkpoint") == 8  # bf16 weights + two bf16 moments
    assert per_param("adamw_kahan", "final_model") == 0  # a hard link to the checkpoint's weights
    assert per_param("adamw_8bit", "checkpoint") == pytest.approx(6.03125)
    assert checkpoint_disk_bytes(n, "adamw_offload") == checkpoint_disk_bytes(n, "adamw")
    # the same state, kept in host RAM (tests/test_gpu_optim.py compares with what is written)
    assert checkpoint_disk_bytes(n, "adamw_kahan_offload") == checkpoint_disk_bytes(
        n, "adamw_kahan")
    assert checkpoint_disk_bytes(n, "adamw")["peak"] == 2 * (12 * n + small) + 2 * n + small


@pytest.fixture
def tiny(tiny_model_dir):
    return load_policy(str(tiny_model_dir), torch.device("cpu"), False), \
        load_tokenizer(str(tiny_model_dir))


def test_policy_state_of_a_checkpoint_has_every_key_and_stores_tied_weights_once(tmp_path, tiny):
    policy, _ = tiny
    opt = make_optimizer(policy, 1e-3, 0.0)
    ckpt = save_checkpoint(tmp_path, 1, policy, opt, EXTRA)
    sd = policy.state_dict()
    loaded = load_policy_state(ckpt)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    embed = sd["model.embed_tokens.weight"]
    assert (ckpt / C.POLICY).stat().st_size < sum(
        v.numel() * 4 for v in sd.values()) - embed.numel() * 4 + 1_000_000


@pytest.mark.parametrize("name", ["adamw", "adamw_kahan"])
def test_final_model_is_bf16_and_loads_with_from_pretrained(tmp_path, tiny, name):
    from transformers import AutoModelForCausalLM

    policy, tok = tiny
    opt = make_optimizer(policy, 1e-3, 0.0, name)
    ckpt = save_checkpoint(tmp_path, 1, policy, opt, EXTRA)
    out = save_final_policy(tmp_path, policy, tok, checkpoint=ckpt)
    linked = os.stat(out / C.FINAL_WEIGHTS).st_ino == os.stat(ckpt / C.POLICY).st_ino
    assert linked == (name == "adamw_kahan")  # the same bytes are not written twice
    loaded = AutoModelForCausalLM.from_pretrained(out)  # dtype from config.json
    assert next(loaded.parameters()).dtype == torch.bfloat16
    want = policy.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k].to(torch.bfloat16)), k
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    assert not list(tmp_path.glob(".final_model*"))


def _failing(exc: BaseException):
    def boom(*args, **kwargs):
        raise exc
    return boom


@pytest.mark.parametrize("target,exc", [
    ("write_safetensors", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                "1472 vs 1366")),
])
def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, target,
                                                                exc):
    net = Net()
    opt = make_optimizer(net, 1e-3, 0.0)
    previous = save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    if target == "torch.save":
        monkeypatch.setattr(C.torch, "save", _failing(exc))
    else:
        monkeypatch.setattr(tensor_io, target, _failing(exc))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, net, opt, EXTRA)
    msg = str(e.value)
    assert "disk is full" in msg and str(tmp_path / "checkpoints") in msg and "\n" not in msg
    need = int(re.search(r"\((\d+) bytes\)", msg).group(1))
    n = sum(p.numel() for p in net.parameters())
    # checkpoint_disk_bytes's number, plus the step counters (one fp32 scalar per tensor)
    assert 0 <= need - checkpoint_disk_bytes(n, "adamw")["checkpoint"] < 1000
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    assert latest_checkpoint(tmp_path) == previous


def test_too_little_free_space_fails_before_writing(tmp_path, monkeypatch):
    net = Net()
    opt = make_optimizer(net, 1e-3, 0.0)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(CheckpointError, match="disk is full: the step-1 checkpoint needs"):
        save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    net = Net(n_mats=1, n_norms=1)
    opt = make_optimizer(net, 1e-3, 0.0)
    monkeypatch.setattr(tensor_io, "write_safetensors",
                        _failing(PermissionError(errno.EACCES, "no")))
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path, 1, net, opt, EXTRA)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_final_model_links_only_a_checkpoint_with_the_same_bf16_tensors(tmp_path, tiny):
    from safetensors.torch import load_file

    policy, tok = tiny
    fp32_ckpt = save_checkpoint(tmp_path, 1, policy, make_optimizer(policy, 1e-3, 0.0), EXTRA)
    make_optimizer(policy, 1e-3, 0.0, "adamw_kahan")  # the policy is bf16 now, the checkpoint not
    out = save_final_policy(tmp_path, policy, tok, checkpoint=fp32_ckpt)
    assert os.stat(out / C.FINAL_WEIGHTS).st_ino != os.stat(fp32_ckpt / C.POLICY).st_ino
    written = load_file(out / C.FINAL_WEIGHTS)
    unique, _ = tensor_io.unique_tensors(policy.state_dict())
    assert all(torch.equal(written[k], v) for k, v in unique.items())
