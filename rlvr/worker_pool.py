"""A persistent pool of spawned worker processes that applies one function to many tasks, each
task under a hard wall-clock bound.

A worker that overruns its task is killed (SIGKILL works even inside C code) and replaced; the
task gets the pool's default result and counts as timed out, and the rest of that worker's chunk
is done elsewhere. A worker that dies under a task is treated the same way. Workers are spawned,
never forked, because the parent may hold CUDA and a vLLM engine. rlvr/reward.py's BatchGrader
runs math-verify on it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

_MAX_CHUNK = 32  # tasks per message; results still come back one by one (see _worker_main)
_STARTUP_TIMEOUT_S = 300.0  # a worker that cannot import and warm up in this long is broken


def _worker_main(conn: Connection, fn: Callable[..., Any], init: Callable[[], None] | None,
                 default: Any) -> None:
    # Ctrl-C reaches the whole process group; let the parent decide how to shut us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init is not None:
        init()
    try:
        conn.send("ready")
        while (chunk := conn.recv()) is not None:
            for idx, args in chunk:
                try:
                    result = fn(*args)
                except Exception:
                    result = default
                # One message per task, so the parent knows which task a stuck worker is on.
                conn.send((idx, result))
    except (EOFError, OSError):
        # The parent is gone (killed, OOM, Ctrl-C): EOF, a reset or a broken pipe, depending on
        # what was in flight. Nothing is waiting for us; exit without a traceback, which would
        # only bury the parent's own last words in the log.
        return


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    outstanding: deque = field(default_factory=deque)  # (idx, args), in the order done
    busy_since: float = 0.0  # when the task at the head of `outstanding` started


class TimeoutPool:
    """`num_workers` spawned processes applying `fn(*args)` to tasks, at most `timeout_s`
    seconds each. `fn` and `init` (run once in each worker before it reports ready, e.g. to warm
    up caches) must be picklable module-level functions; a task whose `fn` raises, times out or
    kills its worker gets `default`. Workers start now, so they warm up while the caller is
    busy. Not thread-safe: call `map` from one thread."""

    def __init__(self, fn: Callable[..., Any], num_workers: int, timeout_s: float, *,
                 init: Callable[[], None] | None = None, default: Any = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn, self.init, self.default = fn, init, default
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main,
                                 args=(child_conn, self.fn, self.init, self.default),
                                 daemon=True, name="rlvr-worker")
        proc.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        return _Worker(proc=proc, conn=parent_conn)

    @staticmethod
    def _stop_worker(worker: _Worker) -> None:
        worker.proc.kill()  # SIGKILL: works even when stuck inside C code (big-int sympy maths)
        worker.proc.join(timeout=5)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop_worker(worker)
        self._workers[self._workers.index(worker)] = self._start_worker()

    def map(self, tasks: list[tuple]) -> tuple[list[Any], set[int]]:
        """`fn(*task)` of every task, in order, and the indices of the tasks that timed out (or
        whose worker died under them), which hold `default`."""
        if not self._workers:
            raise RuntimeError("the worker pool is closed")
        results = [self.default] * len(tasks)
        timed_out: set[int] = set()
        pending: deque[tuple[int, tuple]] = deque(enumerate(tasks))
        n_left = len(pending)
        # A few chunks per worker: large enough to amortise IPC, small enough to balance load.
        chunk = max(1, min(_MAX_CHUNK, math.ceil(n_left / (4 * self.num_workers))))
        waiting_since = time.monotonic()

        def give_up_on(w: _Worker) -> None:
            # The task `w` is stuck on keeps its default; the rest of its chunk goes back in line.
            nonlocal n_left
            if w.outstanding:
                timed_out.add(w.outstanding.popleft()[0])
                n_left -= 1
                pending.extendleft(reversed(w.outstanding))
                w.outstanding.clear()
            self._replace(w)

        while n_left:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and not w.outstanding and pending:
                    items = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    try:
                        w.conn.send(items)
                    except OSError:  # died while idle: nothing of it was lost, just replace it
                        pending.extendleft(reversed(items))
                        self._replace(w)
                        continue
                    w.outstanding.extend(items)
                    w.busy_since = now

            busy = [w for w in self._workers if w.outstanding]
            if busy:
                waiting_since = now
                wait_s = max(0.0, min(w.busy_since for w in busy) + self.timeout_s - now)
            else:  # every worker is still starting up
                wait_s = waiting_since + _STARTUP_TIMEOUT_S - now
                if wait_s <= 0:
                    raise RuntimeError("worker processes did not start")
            by_conn = {w.conn: w for w in self._workers}
            for conn in wait(list(by_conn), timeout=wait_s):
                w = by_conn[conn]
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if msg == "ready":
                            w.ready = True
                            continue
                        idx, result = msg
                        results[idx] = result
                        w.outstanding.popleft()
                        w.busy_since = time.monotonic()
                        n_left -= 1
                except (EOFError, OSError):  # the worker died (crash, OOM kill, ...)
                    if not w.ready:
                        raise RuntimeError(
                            f"worker process exited during start-up (exit code {w.proc.exitcode})"
                        ) from None
                    logger.warning("worker process died (exit code %s)", w.proc.exitcode)
                    give_up_on(w)

            now = time.monotonic()
            for w in list(self._workers):
                if w.outstanding and now - w.busy_since > self.timeout_s:
                    give_up_on(w)
        return results, timed_out

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
