"""A multi-process harness: ``W`` spawned worker processes joined in a gloo group over loopback.

    with World(3) as world:
        results = world.run(fn, *args)      # fn(rank, *args) on every rank, results in rank order

``fn`` must be picklable (a module-level function). A failure on any rank raises :class:`RankFailure`
with every failing rank's traceback. Nothing waits forever: each ``run`` has a timeout, the process
group has its own, and a rank that dies or stops answering is reported by number; the world is then
torn down (``world.alive`` turns false) and a new one must be made (tests/conftest.py's ``worlds``
fixture keeps live worlds for the whole test session).
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp


@dataclass
class Outcome:
    """What one rank's call ended with."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; ``outcomes`` has every rank's result."""

    def __init__(self, message: str, outcomes: list[Outcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, pg_timeout: float, tasks: Any, results: Any, hang_dump: float) -> None:
    import faulthandler

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Inductor's parallel compile pool cannot start inside a daemonic worker: compile in-process.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    results.put(("ready", rank, None))
    while (task := tasks.get()) is not None:
        task_id, fn, args = task
        faulthandler.dump_traceback_later(hang_dump)  # a task stuck this long prints every thread's stack
        try:
            outcome = Outcome(rank, True, fn(rank, *args))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-raises
            outcome = Outcome(rank, False, None, type(e).__name__, str(e), traceback.format_exc())
        faulthandler.cancel_dump_traceback_later()
        results.put((task_id, rank, outcome))
    dist.destroy_process_group()


class World:
    """``world_size`` worker processes in one gloo group (see the module docstring)."""

    def __init__(
        self,
        world_size: int,
        *,
        pg_timeout: float = 120.0,
        start_timeout: float = 120.0,
        hang_dump: float = 150.0,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: environment variables the workers start with (on top of this process's);
        ``pg_timeout``: the gloo group's timeout, which is how long a rank waits in a collective for a
        slower peer (ranks compiling the same graph drifted over 30 s apart on a loaded 32-core host);
        ``hang_dump``: seconds after which a worker still busy with one task prints its stacks to stderr."""
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.pg_timeout = pg_timeout
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout, self._tasks[r], self._results, hang_dump), daemon=True)
            for r in range(world_size)
        ]
        saved = dict(os.environ)
        os.environ.update(env or {})  # spawned children copy the environment at start
        try:
            for p in self._procs:
                p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._next_id = 0
        self.alive = True
        ready = self._collect("ready", start_timeout)
        if not all(o is None for o in ready):
            self.close()
            raise RankFailure(f"world of {world_size} did not start", [o for o in ready if o is not None])

    def _collect(self, task_id: object, timeout: float) -> list[Any]:
        """Wait for every rank's answer to ``task_id``; a dead or silent rank becomes a failed outcome."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            try:
                got_id, rank, outcome = self._results.get(timeout=0.2)
                if got_id == task_id:
                    answers[rank] = outcome
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in answers]
            late = time.monotonic() > deadline
            if dead or late:
                for r in range(self.world_size):
                    if r not in answers:
                        why = f"exited with code {self._procs[r].exitcode}" if r in dead else f"no answer within {timeout:.0f} s"
                        answers[r] = Outcome(r, False, error_type="RankLost", message=f"rank {r} {why}")
                self._drain_and_close(answers)
        return [answers[r] for r in range(self.world_size)]

    def _drain_and_close(self, answers: dict[int, Any]) -> None:
        """Give surviving ranks time to report their own error (a peer died under them), then stop all."""
        deadline = time.monotonic() + self.pg_timeout + 5.0
        while time.monotonic() < deadline and any(o.error_type == "RankLost" and self._procs[o.rank].is_alive() for o in answers.values()):
            try:
                _, rank, outcome = self._results.get(timeout=0.2)
                if isinstance(outcome, Outcome):
                    answers[rank] = outcome
            except queue.Empty:
                pass
        self.close()

    def outcomes(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Outcome]:
        """Run ``fn(rank, *args)`` on every rank; every rank's :class:`Outcome`, failures included."""
        if not self.alive:
            raise RuntimeError("this World was torn down after a failure; make a new one")
        self._next_id += 1
        for q in self._tasks:
            q.put((self._next_id, fn, args))
        return self._collect(self._next_id, timeout)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Any]:
        """Run ``fn(rank, *args)`` on every rank and return the values; raise :class:`RankFailure` if any failed."""
        outcomes = self.outcomes(fn, *args, timeout=timeout)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            detail = "\n".join(f"--- rank {o.rank}: {o.error_type}: {o.message}\n{o.traceback}" for o in failed)
            raise RankFailure(f"{len(failed)} of {self.world_size} ranks failed:\n{detail}", outcomes)
        return [o.value for o in outcomes]

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q, p in zip(self._tasks, self._procs, strict=True):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



#: Environment of workers that run the Triton kernels on CPU tensors, interpreted.
TRITON_INTERPRETED = {"TRITON_INTERPRET": "1", "MOE_OPS_KERNELS": "triton"}


def interpreter_fault(rank: int) -> str:
    """World task: why this worker's Triton interpreter cannot run moe_ops' kernels ("" if it can).
    Triton 3.6's interpreter cannot run a loop over a runtime bound with NumPy >= 2.3 (its scalars are
    1-element arrays there); such a machine (the GPU loaner) tests the compiled kernels instead."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def count_to(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - the probe reports what failed
        return f"Triton {triton.__version__}, NumPy {numpy.__version__}: {type(e).__name__}: {e}"
    return "" if out.item() == 3 else f"Triton {triton.__version__}: loop counted {out.item()} instead of 3"


def set_up(get: Callable[[int], World], task: Callable[[int], None]) -> Callable[[int], World]:
    """``get`` (``size -> World``) whose worlds have run ``task`` on every rank first (installing a
    simulator, for example; the task must be idempotent)."""

    def world(size: int) -> World:
        w = get(size)
        w.run(task)
        return w

    return world
