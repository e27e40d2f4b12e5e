"""Timing helpers shared by the GPU benches: a synchronised clock and the measured bf16 peak."""

from __future__ import annotations

import time

import torch


def now() -> float:
    """Wall time after the device has finished its queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def measured_bf16_peak_tflops() -> float:
    """An 8192^3 bf16 matmul on random data, mean of 10 after 3 warm-ups: the MFU denominator."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0 = now()
    for _ in range(10):
        a @ b
    dt = (now() - t0) / 10
    del a, b
    return 2 * 8192**3 / dt / 1e12
