"""GPU checks of the --optim options (run on the device; skipped without CUDA).

    python -m pip install --no-deps --no-index .whl/*.whl   # torchao, torch-optimi (no network)
    python -m pytest -m gpu tests/test_gpu_optim.py -s

Update quality against exact fp32 AdamW for every option (the offloads included), gradient
clipping honoured by both offloads, GPU/host bytes of a ~50M-parameter model against the OptimSpec
numbers, exact checkpoint resume and its size, and a timing line per option. No vLLM needed; ~60 s
on an H100 before adamw_kahan_offload was added (its host steps: a few seconds more, estimated).
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_optimizers import (  # noqa: E402
    COS_MIN,
    REL_MAX,
    fixed_grads,
    high_precision,
    option,
    plain_bf16,
    quality_table,
    set_grads,
)

from rlvr import checkpoint as C  # noqa: E402
from rlvr import optimizers as O  # noqa: E402
from rlvr.checkpoint import checkpoint_disk_bytes, load_checkpoint, save_checkpoint  # noqa: E402
from rlvr.optimizers import OPTIMIZERS, make_optimizer, state_tensors  # noqa: E402

CUDA = torch.device("cuda")
ALL = list(OPTIMIZERS)
logging.getLogger("torchao").setLevel(logging.ERROR)


class Big(torch.nn.Module):
    """~50M parameters: twelve 2048 x 2048 matrices and two 2048 norms."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        g = torch.Generator(device=CUDA).manual_seed(0)
        self.mats = torch.nn.ParameterList([torch.nn.Parameter(
            torch.randn(2048, 2048, generator=g, device=CUDA).mul_(0.02).to(dtype))
            for _ in range(12)])
        self.norms = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.ones(2048, device=CUDA, dtype=dtype)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(self.mats):
            x = torch.tanh(x @ w) * self.norms[i % 2]
        return x


def test_update_quality_on_cuda():
    cands = {name: option(name) for name in ALL}
    cands["plain bf16 AdamW (torch)"] = (plain_bf16, torch.bfloat16)
    rows = quality_table(cands, device="cuda")
    for name, steps, cos, rel, _, _ in rows:
        if name in OPTIMIZERS:
            assert cos >= COS_MIN and rel <= REL_MAX, (name, steps, cos, rel)
        elif name.startswith("plain"):
            assert cos < COS_MIN and rel > REL_MAX, (name, steps, cos, rel)


def _clipped_update(name: str, library_step: bool = False) -> list[torch.Tensor]:
    """The weights (for Kahan: plus compensation) after one clipped step of lr 1e-3."""
    torch.manual_seed(0)
    net = Big()
    opt = make_optimizer(net, 1e-3, 0.01, name)
    x = torch.randn(64, 2048, device=CUDA).to(OPTIMIZERS[name].param_dtype)
    for _ in range(2):  # two micro-batches accumulate, as policy_update does
        net(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)  # far below the gradient's norm
    if library_step:
        type(opt).__mro__[1].step(opt)  # torchao's own CPUOffloadOptimizer.step
    else:
        opt.step()
    return [high_precision(opt, p) for p in net.parameters()]


def test_offload_steps_with_the_clipped_gradients():
    ref = _clipped_update("adamw")
    got = _clipped_update("adamw_offload")
    for a, b in zip(got, ref):  # fused CPU vs fused CUDA AdamW: rounding only
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    lib = _clipped_update("adamw_offload", library_step=True)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(lib, ref)), \
        "torchao's own step now honours clipping: the re-copy in OffloadAdamW.step can go"


def test_kahan_offload_steps_with_the_clipped_gradients():
    """Against adamw_kahan on the GPU: the same optimi AdamW, there as a Triton kernel that keeps
    each intermediate in fp32, on the host as torch ops that round each one to bf16 (v, sqrt(v) +
    eps, the Kahan sum): a fraction of a percent of an update (max 0.7% of lr, the kernel emulated
    on the CPU). Clipping moves updates far more: the gradients here are so small after it that
    eps takes up to all of an update (torchao's own step, on the CPU with its streams stubbed out:
    0.76 of lr)."""
    lr = 1e-3
    start = [p.detach().to(torch.bfloat16).float() for p in Big().parameters()]

    def updates(name: str, library_step: bool = False) -> list[torch.Tensor]:
        return [w - s for w, s in zip(_clipped_update(name, library_step), start)]

    def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b)) / lr

    ref = updates("adamw_kahan")
    assert max_diff(ref, [torch.zeros_like(u) for u in ref]) > 0.5  # the weights did move
    got = max_diff(updates("adamw_kahan_offload"), ref)
    lib = max_diff(updates("adamw_kahan_offload", library_step=True), ref)
    print(f"\nadamw_kahan_offload vs adamw_kahan, max |update difference| / lr: {got:.4f} "
          f"(torchao's own step, unclipped: {lib:.4f})")
    assert got <= 0.02, got
    assert lib > 0.2, "torchao's own step now honours clipping: the re-copy in step can go"


def _gpu_bytes(fn) -> tuple[int, object]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before, out


@pytest.mark.parametrize("name", ALL)
def test_memory_and_step_time_match_the_spec(name):
    spec = OPTIMIZERS[name]
    net = Big(spec.param_dtype)
    n = sum(p.numel() for p in net.parameters())
    state, opt = _gpu_bytes(lambda: make_optimizer(net, 1e-6, 0.01, name, (0.9, 0.999)))
    x = torch.randn(64, 2048, device=CUDA, dtype=spec.param_dtype)
    grads, _ = _gpu_bytes(lambda: net(x).float().square().mean().backward())
    host = 0
    if hasattr(opt, "param_d2h_map"):  # host copies of weights and grads, and the moments
        host = sum(2 * h.numel() * h.element_size() for h in opt.param_d2h_map.values())
        host += sum(t.numel() * t.element_size() for t in state_tensors(opt) if not t.is_cuda)
    opt.step()  # warm-up (torchao compiles here if the allocation step did not)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 3 * 1e3
    print(f"\n{name:19s} {n / 1e6:.1f}M params | GPU state {state / n:.3f} B/param "
          f"(spec {spec.state_bytes:.3f}) | grads {grads / n:.2f} (spec {spec.grad_bytes}) | "
          f"host {host / n:.2f} (spec {spec.cpu_bytes}) | step {step_ms:.1f} ms")
    assert state == pytest.approx(spec.state_bytes * n, rel=0.05, abs=0.05 * 8 * n)
    assert grads == pytest.approx(spec.grad_bytes * n, rel=0.05)
    assert host == pytest.approx(spec.cpu_bytes * n, rel=0.05)


@pytest.mark.parametrize("name", ALL)
def test_first_step_after_allocation_equals_a_fresh_optimizers(name):
    from test_optimizers import Net

    pre, fresh = Net().to(CUDA), Net().to(CUDA)
    opt_pre = make_optimizer(pre, 1e-2, 0.1, name, (0.9, 0.95))
    for p in fresh.parameters():
        p.data = p.data.to(OPTIMIZERS[name].param_dtype)
    opt_fresh = O._build(name, list(fresh.parameters()), 1e-2, 0.1, (0.9, 0.95))
    for step in range(2):
        for net, opt in ((pre, opt_pre), (fresh, opt_fresh)):
            set_grads(net, fixed_grads(net, step, scale=1.0))
            opt.step()
    for a, b in zip(pre.parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_on_cuda(tmp_path, name):
    def steps(net, opt, first, n):
        for t in range(first, first + n):
            set_grads(net, fixed_grads(net, t, scale=1.0))
            opt.step()

    a = Big()
    opt_a = make_optimizer(a, 1e-3, 0.01, name)
    steps(a, opt_a, 0, 2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ckpt = save_checkpoint(tmp_path, 2, a, opt_a, {})
    save_s = time.perf_counter() - t0
    steps(a, opt_a, 2, 2)
    b = Big()
    for p in b.parameters():
        p.data.normal_()
    opt_b = make_optimizer(b, 1e-3, 0.01, name)
    t0 = time.perf_counter()
    load_checkpoint(ckpt, b, opt_b)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    steps(b, opt_b, 2, 2)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"\n{name:19s} checkpoint {size / 1e6:.0f} MB: save {save_s:.2f} s "
          f"({size / save_s / 1e9:.2f} GB/s), load {load_s:.2f} s")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), name
    # checkpoint_disk_bytes's number; it counts the 8-bit option's fp32 moments of the two norms
    # as 8-bit ones and reserves 32 MiB for small files
    n = sum(p.numel() for p in a.parameters())
    predicted = checkpoint_disk_bytes(n, name)["checkpoint"] - C._SMALL_FILES_BYTES
    assert 0 <= size - predicted <= 8 * 2 * 2048 + (1 << 20), (name, size, predicted)
