"""A process pool whose calls are bounded by a wall-clock deadline.

Some scorers (math-verify) guard against pathological inputs with ``signal.alarm``, which only
works in a process's main thread and cannot interrupt code stuck in C. :class:`DeadlineProcessPool`
runs such a callable in spawned worker processes (a ``ProcessPoolExecutor`` worker executes
tasks in its main thread) and, when a call outlives its deadline, kills every worker, reaps it,
starts a fresh pool, marks that call as timed out and resubmits the calls that were killed
alongside it. No worker outlives :meth:`DeadlineProcessPool.close`.

The callable is named by import path (``"package.module:function"``) so that any module-level
function importable by the workers can be injected (workers inherit the parent's ``sys.path``).
As with any spawn-based pool, a script using it must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from pipeline.rewards.base import describe_exception


def _split_callable_path(path: str) -> tuple[str, str]:
    """Split ``"package.module:function"`` into (module, attribute); ValueError if malformed."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"callable path must look like 'package.module:function', got {path!r}")
    return module_name, attribute


@cache
def _resolve_callable(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function (cached per process).

    Raises:
        ValueError: if ``path`` is not of the form ``module:attribute``.
        TypeError: if the attribute is not callable.
    """
    module_name, attribute = _split_callable_path(path)
    fn: object = getattr(importlib.import_module(module_name), attribute)
    if not callable(fn):
        raise TypeError(f"{path!r} names a {type(fn).__name__}, not a function")
    return fn


@dataclass(frozen=True)
class CallOutcome:
    """Result of one call: its return value, ``timed_out=True``, or what it raised (``error``,
    see :func:`describe_exception`); value None unless the call returned."""

    value: Any = None
    timed_out: bool = False
    error: str | None = None


def _invoke(path: str, args: tuple[Any, ...]) -> CallOutcome:
    """Worker-side task: call the function named by ``path`` with ``args``.

    What the function raises is returned as the outcome; failing to import it raises.
    """
    fn = _resolve_callable(path)
    try:
        return CallOutcome(value=fn(*args))
    except Exception as error:
        return CallOutcome(error=describe_exception(error))


class DeadlineProcessPool:
    """Runs ``fn(*args)`` in ``num_workers`` spawned processes with a per-call deadline.

    A call's deadline runs from its submission; at most ``num_workers`` calls are in flight, so
    a call never waits in the queue behind others. Right after the pool (re)starts, the
    deadline also covers worker start-up (spawn + importing ``fn``'s module, typically 0.2-2 s),
    so choose ``timeout_s`` well above it. A ``fn_path`` whose module does not exist raises at
    construction; one that fails to import or names no function raises in the first call
    (ImportError / AttributeError / TypeError).

    An exception raised by ``fn`` is that call's outcome (``CallOutcome.error``); the batch's
    other calls go on. If a worker dies, ``BrokenProcessPool`` propagates (the batch's other
    calls are abandoned) after the pool is restarted, so it stays usable.

    Thread-safe: concurrent :meth:`map` calls (the queue scores groups from several worker
    threads) take the workers one batch at a time. Without that, their calls queued behind
    each other's, timed out while waiting, and one batch's restart killed the others' workers
    (a run stalled after two spurious timeouts).
    """

    def __init__(self, fn_path: str, num_workers: int, timeout_s: float) -> None:
        """
        Args:
            fn_path: ``"package.module:function"``, a module-level function (picklable
                arguments and return value).
            num_workers: number of worker processes, >= 1.
            timeout_s: wall-clock seconds a call may take before it is abandoned, > 0.

        Raises:
            ValueError: on a malformed ``fn_path``, or ``num_workers`` / ``timeout_s`` not > 0.
            ModuleNotFoundError: ``fn_path``'s module (or a parent package) does not exist.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got num_workers={num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got timeout_s={timeout_s}")
        module_name, _ = _split_callable_path(fn_path)
        if importlib.util.find_spec(module_name) is None:
            raise ModuleNotFoundError(f"no module {module_name!r} (callable path {fn_path!r})")
        self._fn_path = fn_path
        self._num_workers = num_workers
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self._num_workers,
            mp_context=multiprocessing.get_context("spawn"),
        )

    def _live_executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            raise RuntimeError("DeadlineProcessPool is closed")
        return self._executor

    def _kill_workers(self) -> None:
        """SIGKILL every worker, reap it, and shut the executor down."""
        executor = self._live_executor()
        # ProcessPoolExecutor has no public kill before Python 3.14 (kill_workers); its
        # ``_processes`` maps pid -> multiprocessing.Process for the live workers.
        workers = list(executor._processes.values())
        for worker in workers:
            worker.kill()
        executor.shutdown(wait=True, cancel_futures=True)
        for worker in workers:
            worker.join()

    def _restart(self) -> None:
        self._kill_workers()
        self._executor = self._new_executor()

    def map(self, calls: Sequence[tuple[Any, ...]]) -> list[CallOutcome]:
        """Run ``fn(*args)`` for each ``args`` in ``calls``; outcomes in input order (one
        batch at a time across threads)."""
        with self._lock:
            return self._map(calls)

    def _map(self, calls: Sequence[tuple[Any, ...]]) -> list[CallOutcome]:
        outcomes: list[CallOutcome | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        running: dict[Future[Any], tuple[int, float]] = {}
        try:
            while pending or running:
                while pending and len(running) < self._num_workers:
                    index = pending.popleft()
                    future = self._live_executor().submit(_invoke, self._fn_path, calls[index])
                    running[future] = (index, time.monotonic() + self._timeout_s)
                next_deadline = min(deadline for _, deadline in running.values())
                done, _ = wait(
                    running,
                    timeout=max(0.0, next_deadline - time.monotonic()),
                    return_when=FIRST_COMPLETED,
                )
                for future in done:
                    index, _ = running.pop(future)
                    outcomes[index] = future.result()
                now = time.monotonic()
                expired = [
                    f for f, (_, deadline) in running.items() if deadline <= now and not f.done()
                ]
                if expired:
                    for future in expired:
                        outcomes[running.pop(future)[0]] = CallOutcome(timed_out=True)
                    # Calls killed alongside go back to the front of the queue, in input order.
                    killed = sorted((index for index, _ in running.values()), reverse=True)
                    pending.extendleft(killed)
                    running.clear()
                    self._restart()
        except BaseException as error:
            # A dead worker breaks the executor; calls still running for an abandoned batch
            # would delay later ones. Either way, start afresh before propagating.
            if isinstance(error, BrokenProcessPool) or running:
                self._restart()
            raise
        return cast(list[CallOutcome], outcomes)

    def close(self) -> None:
        """Stop and reap all workers (after the batch running, if any); idempotent."""
        with self._lock:
            if self._executor is not None:
                self._kill_workers()
                self._executor = None
