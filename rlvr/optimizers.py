"""Optimizer options (`--optim`): how the AdamW weights and state are kept, and what they cost.

| name | weights the model keeps | AdamW moments | library |
|---|---|---|---|
| `adamw` | fp32 masters (bf16 autocast) | fp32, GPU | torch AdamW (fused on CUDA) |
| `adamw_kahan` | bf16 + bf16 Kahan compensation | bf16, GPU | optimi AdamW |
| `adamw_8bit` | fp32 masters | 8-bit + block scales, GPU | torchao AdamW8bit |
| `adamw_offload` | fp32 masters, grads on GPU | fp32, host RAM | torchao CPUOffloadOptimizer |
| `adamw_kahan_offload` | bf16, grads on GPU | bf16 + Kahan comp., host RAM | torchao over optimi |

An offload option steps the library optimizer of the option it offloads (`_OFFLOADED`) on host
copies of the weights, one per large tensor, and copies the weights back after every step.

Every option is AdamW with decoupled weight decay multiplied by the learning rate (torch's
semantics), eps 1e-8, and its state allocated before the first step (see `allocate_state`).
tests/test_optimizers.py measures each against exact fp32 AdamW; torchao's bf16 stochastic rounding
is not offered because it fails that comparison (its rounding noise swamps lr-1e-6 updates).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# torchao stores each moment of a tensor with >= 4096 elements (a multiple of the block) as uint8
# codes plus one fp32 scale per 256-element block; smaller tensors keep fp32 moments. The
# per-parameter numbers below are for the large tensors (> 99.9% of a Qwen2.5 model's parameters).
_BLOCK = 256
_8BIT_STATE = 2 * (1 + 4 / _BLOCK)


@dataclass(frozen=True)
class OptimSpec:
    """What one option keeps, in bytes per parameter, for the memory planner and the README.

    param_dtype: dtype of the model's weights during training (fp32 masters or bf16).
    grad_bytes: gradient bytes on the GPU. state_bytes: optimizer state on the GPU (moments, Kahan
    buffers, 8-bit scales). cpu_bytes: host RAM it pins (offload: host copies of weights, grads and
    moments). saved_state_bytes: optimizer bytes a resumable checkpoint writes.
    exact: the same fp32 AdamW arithmetic as torch's (up to summation order).
    """
    param_dtype: torch.dtype
    grad_bytes: float
    state_bytes: float
    cpu_bytes: float
    saved_state_bytes: float
    exact: bool
    needs_cuda: bool
    summary: str

    @property
    def param_bytes(self) -> int:
        return self.param_dtype.itemsize


OPTIMIZERS: dict[str, OptimSpec] = {
    "adamw": OptimSpec(
        torch.float32, 4, 8, 0, 8, exact=True, needs_cuda=False,
        summary="fp32 master weights and fp32 AdamW moments on the GPU (torch AdamW)"),
    "adamw_kahan": OptimSpec(
        torch.bfloat16, 2, 6, 0, 6, exact=False, needs_cuda=False,
        summary="bf16 weights with Kahan-compensated updates, bf16 moments (optimi AdamW)"),
    "adamw_8bit": OptimSpec(
        torch.float32, 4, _8BIT_STATE, 0, _8BIT_STATE, exact=False, needs_cuda=False,
        summary="fp32 master weights, 8-bit block-quantized AdamW moments (torchao AdamW8bit)"),
    "adamw_offload": OptimSpec(
        torch.float32, 4, 0, 16, 8, exact=True, needs_cuda=True,
        summary="fp32 master weights and grads on the GPU, fp32 AdamW stepped in host RAM "
                "(torchao CPUOffloadOptimizer)"),
    "adamw_kahan_offload": OptimSpec(
        torch.bfloat16, 2, 0, 10, 6, exact=False, needs_cuda=True,
        summary="bf16 weights and grads on the GPU, Kahan-compensated bf16 AdamW stepped in host "
                "RAM (torchao CPUOffloadOptimizer over optimi AdamW)"),
}
# offload option -> the option whose library optimizer it steps on the host
_OFFLOADED = {"adamw_offload": "adamw", "adamw_kahan_offload": "adamw_kahan"}

EPS = 1e-8


def _spec(name: str) -> OptimSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def param_dtype_for(name: str) -> torch.dtype:
    """The dtype to load the model in for this option (then make_optimizer casts nothing)."""
    return _spec(name).param_dtype


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, name: str = "adamw",
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW of the chosen option over all of `model`'s parameters, constant learning rate.

    The parameters are cast in place (same Parameter objects, so tied weights stay tied) to the
    dtype the option keeps. The state is allocated here rather than at the first real step:
    allocated mid-step, it lands in memory segments shared with activations, and those segments
    can never be returned to the driver while vLLM needs the memory (docs/PERFORMANCE.md).
    """
    spec = _spec(name)
    params = list(model.parameters())
    device = params[0].device
    if spec.needs_cuda and device.type != "cuda":
        raise ValueError(f"--optim {name} needs a CUDA GPU (the model is on {device})")
    for p in params:
        if p.is_floating_point() and p.dtype != spec.param_dtype:
            p.data = p.data.to(spec.param_dtype)
    opt = _build(name, params, lr, weight_decay, betas)
    allocate_state(opt)
    return opt


def _build(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
           betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The library optimizer, state not yet allocated."""
    if name == "adamw_8bit":
        # AdamW8bit decays as p -= lr * wd * p before the Adam step, as torch's AdamW does
        return _import_torchao_optim().AdamW8bit(params, lr=lr, betas=betas,
                                                 weight_decay=weight_decay, eps=EPS,
                                                 block_size=_BLOCK)
    if name in _OFFLOADED:  # fused: torch's AdamW has a fused kernel on the CPU too
        cls, kwargs = _adamw(_OFFLOADED[name], lr, weight_decay, betas, fused=True)
        return _offload_class()(params, optimizer_class=cls, **kwargs)
    cls, kwargs = _adamw(name, lr, weight_decay, betas, fused=params[0].is_cuda)
    return cls(params, **kwargs)


def _adamw(name: str, lr: float, weight_decay: float, betas: tuple[float, float],
           fused: bool) -> tuple[type, dict]:
    """The AdamW class of `adamw` or `adamw_kahan` and its arguments."""
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=EPS)
    if name == "adamw":
        return torch.optim.AdamW, {**kwargs, "fused": fused}
    import optimi

    # decouple_lr=False: optimi's "decoupled" decay multiplies by lr, exactly like torch's
    # AdamW (decouple_lr=True would make it independent of lr); its eps default is 1e-6.
    return optimi.AdamW, {**kwargs, "decouple_lr": False, "kahan_sum": True}


def check_libraries(name: str) -> None:
    """Import what option `name` needs now, so a missing package is a one-line error before
    vLLM's minutes of start-up rather than after them (ValueError)."""
    needs = {"adamw_kahan": "optimi", "adamw_kahan_offload": "optimi"}.get(name)
    try:
        if needs:
            __import__(needs)
        if name in ("adamw_8bit", "adamw_offload", "adamw_kahan_offload"):
            _import_torchao_optim()
    except ImportError as e:
        raise ValueError(f"--optim {name} needs a package that is not installed ({e.name}); "
                         "pip install -r requirements.txt") from None


def _import_torchao_optim():
    """torchao.optim, without the import-time warnings of its CUDA kernels failing to load on
    machines that cannot run them (the optimizers here do not use those kernels)."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.optim
    finally:
        log.setLevel(level)
    return torchao.optim


@functools.cache
def _offload_class() -> type:
    CPUOffloadOptimizer = _import_torchao_optim().CPUOffloadOptimizer

    class OffloadAdamW(CPUOffloadOptimizer):
        """CPUOffloadOptimizer whose host gradients are the ones the step is taken with; its
        `optimizer_class` (torch's fused AdamW, or optimi's Kahan AdamW) steps each host tensor.

        The library copies a gradient to the host in a post-accumulate-grad hook, i.e. before
        clip_grad_norm_ scales it (the host would step with the unclipped gradient), and never for
        a gradient set without a backward. step() copies every gradient again, after clipping;
        the hook's copies become redundant, but overlap the backward.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # the library copies the weights to the host (non_blocking) and does not wait for
            # them: allocate_state's host step could otherwise read one before it has arrived
            torch.cuda.current_stream().synchronize()

        @torch.no_grad()
        def step(self, closure=None):
            self.queue.clear()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for p_dev, p_host in self.param_d2h_map.items():
                    if p_dev.grad is not None:
                        p_host.grad.copy_(p_dev.grad, non_blocking=True)
                        self.queue[p_dev] = self.stream.record_event()
            return super().step(closure)

        @torch.no_grad()
        def reload_params(self) -> None:
            """Refresh the host copies of the weights after they were loaded into the model."""
            for p_dev, p_host in self.param_d2h_map.items():
                p_host.copy_(p_dev)

    return OffloadAdamW


def library_optimizers(opt: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The plain optimizers that hold state: the offload wrapper runs one per host tensor plus
    one on the GPU for tensors too small to offload."""
    if hasattr(opt, "optim_dict"):
        return [*opt.optim_dict.values(), *([opt.d_opt] if opt.d_opt is not None else [])]
    return [opt]


@torch.no_grad()
def allocate_state(opt: torch.optim.Optimizer) -> None:
    """Run one step with zero gradients and lr = 0, then reset the step counters.

    The weights do not move (every update term, decay included, is multiplied by lr = 0; the
    decay is left as it is so torchao does not compile its step for a second value), the
    moments (and Kahan compensations) stay exactly zero, and with step = 0 the next step is a
    true first step, bias correction included (tests/test_optimizers.py checks it against a
    fresh optimizer).
    """
    for inner in library_optimizers(opt):
        _zero_step(inner)


def _zero_step(opt: torch.optim.Optimizer) -> None:
    saved = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        # torchao keeps lr as a tensor and refuses a float in its place
        g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
    params = [p for g in opt.param_groups for p in g["params"]]
    made = [p.grad is None for p in params]
    for p, new in zip(params, made):
        if new:
            p.grad = torch.zeros_like(p)
        else:  # the offload's pinned host buffer: keep it, but it holds garbage until now
            p.grad.zero_()
    opt.step()
    for p, new in zip(params, made):
        if new:
            p.grad = None
    for holder in [*opt.state.values(), *opt.param_groups]:  # optimi counts steps per group
        if torch.is_tensor(holder.get("step")):
            holder["step"].zero_()
        elif "step" in holder:
            holder["step"] = 0
    for g, lr in zip(opt.param_groups, saved):
        g["lr"] = lr


def state_tensors(opt: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    """Every plain tensor of the optimizer's state (8-bit states as their codes, scales and code
    table), e.g. to count the bytes it holds."""
    for inner in library_optimizers(opt):
        for st in inner.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    yield from _plain_tensors(v)


def _plain_tensors(t: torch.Tensor) -> Iterable[torch.Tensor]:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _plain_tensors(getattr(t, n))
    else:
        yield t
