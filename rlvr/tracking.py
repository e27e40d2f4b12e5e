"""Run logging: TensorBoard scalars and text, the same scalars in metrics.jsonl, and provenance."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from rlvr.evaluation import EVAL_PROBLEMS_FILE

PACKAGES = ("torch", "transformers", "vllm", "math-verify", "tensorboard", "accelerate", "gguf")


def provenance(device: torch.device) -> dict:
    """Where a run's numbers came from: code version, package versions, hardware."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = git("rev-parse", "HEAD")
    return {
        # a copy of the tree without its history answers "HEAD" or nothing: record no commit
        "git_commit": commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join(sys.argv),
    }


class RunLogger:
    """Writes every scalar to TensorBoard and to metrics.jsonl, one JSON line per (step, group),
    and each eval's per-problem results to eval_problems.jsonl.

    On resume from a checkpoint at step S, whatever a crashed process logged after S is removed:
    TensorBoard hides it through `purge_step`, and both JSON-lines files are rewritten without it.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.problems_path = self.run_dir / EVAL_PROBLEMS_FILE
        purge = None
        if resume_step is not None:
            purge = resume_step + 1
            for path in (self.metrics_path, self.problems_path):
                truncate_jsonl(path, resume_step)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._problems = open(self.problems_path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {}
        for tag, value in metrics.items():
            value = float(value)
            clean[tag] = value if math.isfinite(value) else None
            self.writer.add_scalar(tag, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        self.writer.flush()

    def problems(self, step: int, records: list[dict]) -> None:
        """One eval's per-problem results, one line each, written in one piece."""
        self._problems.write("".join(json.dumps({"step": step, **r}) + "\n" for r in records))
        self._problems.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        self.writer.close()
        self._jsonl.close()
        self._problems.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of a JSON-lines log with "step" <= last_step (torn lines dropped)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(ln)["step"] <= last_step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by a crash mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)


class ProcessMemorySampler:
    """This process's GPU memory as the driver counts it (nvidia-smi's per-process figure), the
    peak over the `sample()` calls since the last `take_peak_gib()`.

    torch's own counters miss what vLLM and the CUDA context hold outside torch's allocator, and
    a card shared by several runs makes the device-wide figure useless, so this is the number
    that says whether a run fits its budget. It is sampled where the peak is, not on a timer:
    torch's caching allocator keeps a phase's blocks reserved until `empty_cache`, so the driver's
    count just before each `empty_cache` (after the rollout, after the update, after an eval) is
    that phase's high-water mark. (A 10 Hz polling thread made rollouts 20-80% slower and erratic
    on an H100: NVML queries contend with the decode loop's kernel launches.) Inactive (None)
    without NVML or CUDA.
    """

    def __init__(self):
        self._peak = 0
        self._handle = None
        try:
            import pynvml  # nvidia-ml-py: installed with vllm and on the GPU image

            pynvml.nvmlInit()
            if torch.cuda.is_available():
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no NVML, no GPU: nothing to sample
            self._handle = None

    def sample(self) -> None:
        if self._handle is None:
            return
        pid = os.getpid()
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == pid:
                self._peak = max(self._peak, proc.usedGpuMemory or 0)

    def take_peak_gib(self) -> float | None:
        """The peak since the last call (and restart the count)."""
        if self._handle is None:
            return None
        self.sample()
        peak, self._peak = self._peak, 0
        return peak / 2**30


def memory_metrics(device: torch.device, sampler: ProcessMemorySampler | None,
                   planned: float | None = None) -> dict:
    """GiB. mem/peak_gb: the most torch allocated since the last record (vLLM's sleep-mode pool
    included); mem/process_peak_gb: this process's peak as the driver counts it (nvidia-smi's
    per-process figure: torch, vLLM and the CUDA context); mem/device_used_gb: the whole card
    now. On CPU: the process's peak resident memory."""
    if device.type != "cuda":
        return {"mem/peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    free, total = torch.cuda.mem_get_info(device)
    out = {"mem/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
           "mem/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
           "mem/device_used_gb": (total - free) / 2**30}
    if sampler is not None and (peak := sampler.take_peak_gib()) is not None:
        out["mem/process_peak_gb"] = peak
    if planned is not None:
        out["mem/planned_peak_gb"] = planned
    torch.cuda.reset_peak_memory_stats(device)
    return out
