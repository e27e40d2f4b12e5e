"""A rollout engine in a process of its own, so that it generates while the trainer trains.

The trainer sends a request over a pipe and carries on; the engine process generates (for an
eval: and grades) and answers when done. Two uses: the in-loop eval of step k on a second engine
while the next training steps run, and one-step-off rollouts, where the rollout engine generates
step t+1's batch while the update of step t runs. Requests are served one at a time, in order.

Weights cross into the engine process without a trip through the host on a GPU: the trainer
copies them, chunk by chunk, into one buffer that both processes map (CUDA IPC), and the engine
process copies each chunk into its own model before the next one is written. On the CPU (the HF
engine, tests) they are pickled through the pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

# The shared buffer's size: weights go across in chunks of at most this many bytes.
IPC_BUFFER_BYTES = 512 << 20


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds: rlvr.engines.make_engine's arguments, and for evals a
    grader (BatchGrader's workers: None for its default)."""
    backend: str
    model_dir: str
    max_model_len: int
    seed: int
    max_num_seqs: int = 512
    kv_cache_bytes: int | None = None
    grader: bool = False
    grader_workers: int | None = None
    grade_timeout_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)  # set before anything is imported there


class EngineProcessError(RuntimeError):
    """The engine process failed a request, or died."""


class EngineProcess:
    """The client side: start the process, send weights and requests, collect answers.

    `submit` returns a ticket at once; `result(ticket)` waits for that answer, `ready(ticket)`
    says whether it has come. Answers arrive in the order the requests were sent.
    """

    def __init__(self, spec: EngineSpec):
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self._conn, child = ctx.Pipe()
        # not a daemon: an eval engine has grader processes of its own; it ends when the trainer
        # closes it, or when the pipe breaks (the trainer died)
        self.proc = ctx.Process(target=_serve, args=(child, spec), name="rlvr-engine")
        self.proc.start()
        child.close()
        self._next, self._answers = 0, {}
        self._buffer: torch.Tensor | None = None
        self._ipc: bool | None = None  # whether CUDA IPC works between the two (tried once)
        # not waited for here: the engine builds while the trainer loads its own models
        self._ready_ticket, self._info = self._ticket(), None

    def wait_ready(self) -> None:
        """Wait until the engine is built (raises EngineProcessError if it could not be, and
        again on every later call)."""
        if isinstance(self._info, EngineProcessError):
            raise self._info
        if self._info is None:
            try:
                self._info = self.result(self._ready_ticket)
            except EngineProcessError as e:
                self._info = e
                raise

    @property
    def name(self) -> str:
        self.wait_ready()
        return self._info[0]

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype the engine takes weights in: vLLM bf16; the HF engine its model's own (None),
        so that it samples exactly as the trainer's copy would."""
        self.wait_ready()
        return self._info[1]

    def _ticket(self) -> int:
        self._next += 1
        return self._next - 1

    def submit(self, kind: str, **payload) -> int:
        ticket = self._ticket()
        self._conn.send((kind, ticket, payload))
        return ticket

    def _receive(self) -> None:
        try:
            status, ticket, value = self._conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise EngineProcessError(f"the engine process died (exit code "
                                     f"{self.proc.exitcode}); its output is above") from None
        if status == "error":
            raise EngineProcessError(f"the engine process failed a request:\n{value}")
        self._answers[ticket] = value

    def ready(self, ticket: int) -> bool:
        while ticket not in self._answers and self._conn.poll():
            self._receive()
        return ticket in self._answers

    def result(self, ticket: int):
        while ticket not in self._answers:
            self._receive()
        return self._answers.pop(ticket)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy these (HF name, tensor) pairs into the engine's model; returns once it has them.
        Waits behind any request already sent (the engine serves one at a time)."""
        self.wait_ready()  # a build error is reported as such, not as a transfer's
        weights = iter(weights)
        first = next(weights, None)
        if first is None:
            return
        if first[1].is_cuda and self._ipc_works():
            self._load_by_ipc(first, weights)
        else:  # through the pipe, on the host
            self.result(self.submit("weights", tensors=[(n, t.detach().cpu())
                                                        for n, t in [first, *weights]]))

    def _ipc_works(self) -> bool:
        """Whether the engine process can map this process's GPU memory (CUDA IPC: not every
        container runtime allows it): tried once, with the transfer buffer itself."""
        if self._ipc is None:
            from torch.multiprocessing.reductions import reduce_tensor

            try:
                self._buffer = torch.empty(IPC_BUFFER_BYTES, dtype=torch.uint8, device="cuda")
                self._buffer[:8] = torch.arange(8, dtype=torch.uint8)
                torch.cuda.current_stream().synchronize()
                self._handle = reduce_tensor(self._buffer)[1]
                self._ipc = self.result(self.submit("ipc_probe", handle=self._handle)) == 28
            except (RuntimeError, EngineProcessError) as e:
                print(f"note: the engine process cannot map this process's GPU memory "
                      f"({str(e).strip().splitlines()[-1]}): weights go through the host",
                      flush=True)
                self._ipc, self._buffer = False, None
        return self._ipc

    def _load_by_ipc(self, first: tuple[str, torch.Tensor],
                     rest: Iterable[tuple[str, torch.Tensor]]) -> None:
        chunk, used = [], 0
        for name, t in [first, *rest]:  # one tensor at a time: the iterator may gather shards
            flat = t.detach().contiguous().view(-1).view(torch.uint8)
            if flat.numel() > IPC_BUFFER_BYTES:
                raise ValueError(f"{name}: {flat.numel()} bytes exceed the {IPC_BUFFER_BYTES}-byte "
                                 "transfer buffer")
            if used + flat.numel() > IPC_BUFFER_BYTES:
                self._send_chunk(chunk)
                chunk, used = [], 0
            self._buffer[used:used + flat.numel()].copy_(flat)
            chunk.append((name, used, flat.numel(), str(t.dtype).removeprefix("torch."),
                          tuple(t.shape)))
            used += flat.numel()
        self._send_chunk(chunk)

    def _send_chunk(self, chunk: list) -> None:
        if chunk:
            torch.cuda.current_stream().synchronize()  # the buffer is written before it is read
            self.result(self.submit("weights_ipc", handle=self._handle, chunk=chunk))

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 return_logprobs: bool = False, top_p: float = 1.0,
                 seeds: list[int] | None = None):
        """RolloutEngine.generate, on the engine process (waiting for it)."""
        return self.result(self.submit("generate", prompts=prompts, n=n, temperature=temperature,
                                       max_tokens=max_tokens, return_logprobs=return_logprobs,
                                       top_p=top_p, seeds=seeds))

    def sleep(self) -> None:
        """Engine processes never sleep: they work while the trainer trains."""

    def close(self) -> None:
        try:  # the engine reads requests only once built: one still building is stopped
            building = self._info is None and not self._conn.poll()
        except OSError:
            building = False
        if self.proc.is_alive() and not building:
            try:
                self._conn.send(("close", -1, {}))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self._buffer = None


# ----------------------------------------------------------------------------- the engine side


def _serve(conn, spec: EngineSpec) -> None:
    """The engine process: build the engine, then answer requests until told to close."""
    os.environ.update(spec.env)
    from rlvr.console import quiet_third_party

    quiet_third_party()
    try:
        engine, grader = _build(spec)
    except Exception:  # noqa: BLE001 - reported to the trainer, which stops with it
        conn.send(("error", 0, traceback.format_exc()))
        return
    dtype = None if engine.name == "hf" else torch.bfloat16
    conn.send(("done", 0, (engine.name, dtype)))
    buffers: dict = {}
    try:
        while True:
            kind, ticket, payload = conn.recv()
            if kind == "close":
                return
            try:
                conn.send(("done", ticket, _answer(engine, grader, buffers, kind, payload)))
            except Exception:  # noqa: BLE001 - the trainer decides what a failure means
                conn.send(("error", ticket, traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):  # the trainer is gone, or stopping
        return
    finally:
        if grader is not None:
            grader.close()


def _build(spec: EngineSpec):
    from rlvr.engines import make_engine
    from rlvr.eval_worker import engine_eos_ids
    from rlvr.modeling import load_tokenizer
    from rlvr.reward import BatchGrader

    tokenizer = load_tokenizer(spec.model_dir)
    engine = make_engine(spec.backend, spec.model_dir, tokenizer,
                         engine_eos_ids(spec.model_dir, tokenizer),
                         max_model_len=spec.max_model_len, seed=spec.seed,
                         max_num_seqs=spec.max_num_seqs, kv_cache_bytes=spec.kv_cache_bytes)
    grader = (BatchGrader(num_workers=spec.grader_workers, timeout_s=spec.grade_timeout_s)
              if spec.grader else None)
    return engine, grader


def _answer(engine, grader, buffers: dict, kind: str, payload: dict):
    if kind == "generate":
        return engine.generate(**payload)
    if kind == "eval":
        from rlvr.eval_run import run_eval

        if grader is None:
            raise ValueError("this engine process has no grader: start it with grader=True")
        return run_eval(engine, grader, **payload)
    if kind == "weights":
        _load(engine, payload["tensors"])
        return None
    if kind in ("weights_ipc", "ipc_probe"):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        if "ipc" not in buffers:  # the trainer's one buffer, mapped once
            args = list(payload["handle"])
            args[6] = torch.cuda.current_device()  # the storage device, as numbered here
            buffers["ipc"] = rebuild_cuda_tensor(*args)
        buf = buffers["ipc"]
        if kind == "ipc_probe":  # the trainer wrote 0..7 there
            return int(buf[:8].sum())
        _load(engine, [(name, buf[start:start + size].view(getattr(torch, dtype)).view(shape))
                       for name, start, size, dtype, shape in payload["chunk"]])
        torch.cuda.synchronize()  # copied out before the trainer writes the next chunk
        return None
    raise ValueError(f"unknown request {kind!r}")


@torch.no_grad()
def _load(engine, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Into vLLM by its loader; into the HF engine's own model (this process's copy) by name."""
    if engine.name != "hf":
        engine.load_weights(tensors)
        return
    params = dict(engine.policy.named_parameters())
    for name, t in tensors:
        params[name].copy_(t)
