"""An ordered ``map`` over worker processes that survives the death of a worker.

``multiprocessing.Pool`` loses the task of a worker killed from outside (the OOM killer, a crash
in a native decoder) and waits for its result forever. ``concurrent.futures.ProcessPoolExecutor``
notices (``BrokenProcessPool``), but then every task in flight fails with it and the culprit is
unknown. :class:`SurvivingMap` keeps going:

1. tasks run in order on a pool of ``workers`` spawned processes, at most ``2 * workers`` in flight;
2. when the pool breaks, the in-flight tasks that did not finish are run again *one at a time* in a
   fresh single-worker pool, so a task that kills its worker again is identified;
3. a task whose worker died on that retry too yields :data:`DIED` (the caller records it, e.g.
   ``tgdp.prepare``'s skip reason ``worker_died``); then a fresh pool takes the remaining tasks.

Results come back in task order, so a deterministic function gives deterministic output whatever
the worker count or deaths. Nothing here waits without a bound on a dead process.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

__all__ = ["DIED", "SurvivingMap"]


class _Died:
    def __repr__(self) -> str:
        return "DIED"


DIED = _Died()   # the result of a task whose worker process died twice


class SurvivingMap:
    """``SurvivingMap(fn, workers)(tasks)`` yields ``fn(task)`` per task in order, or :data:`DIED`.

    ``fn`` must be picklable (a module-level function). ``executor``: an open
    ``ProcessPoolExecutor`` to use first (the caller shuts it down; replacements are this object's).
    ``retried`` counts tasks re-run after a death, ``died`` those that yielded DIED.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, executor: Executor | None = None):
        if workers < 1:
            raise ValueError(f"workers={workers!r} must be >= 1")
        self.fn, self.workers = fn, workers
        self._given = executor
        self.retried = 0
        self.died = 0

    def _new(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, tasks: Iterable[Any]) -> Iterator[Any]:
        todo = deque(enumerate(tasks))
        pool = self._given or self._new(self.workers)
        own = pool is not self._given
        window: deque[tuple[int, Any, Future]] = deque()
        try:
            while todo or window:
                broken = False
                while todo and len(window) < 2 * self.workers:
                    try:
                        fut = pool.submit(self.fn, todo[0][1])
                    except BrokenProcessPool:   # a worker died since the last result
                        broken = True
                        break
                    i, task = todo.popleft()
                    window.append((i, task, fut))
                if not broken:
                    i, task, fut = window[0]
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        broken = True
                    else:
                        window.popleft()
                        yield res
                        continue
                # The pool is dead: keep what finished, re-run the rest alone, then start a new pool.
                suspects = list(window)
                window.clear()
                if own:
                    pool.shutdown(wait=False, cancel_futures=True)
                for _, task, f in suspects:
                    ok = f.done() and not f.cancelled() and f.exception() is None
                    yield f.result() if ok else self._alone(task)
                pool, own = self._new(self.workers), True
        finally:
            if own:
                pool.shutdown(wait=not window, cancel_futures=True)

    def _alone(self, task: Any) -> Any:
        """``fn(task)`` in a fresh single-worker pool; DIED if that worker dies too."""
        self.retried += 1
        solo = self._new(1)
        try:
            return solo.submit(self.fn, task).result()
        except BrokenProcessPool:
            self.died += 1
            return DIED
        finally:
            solo.shutdown(wait=False, cancel_futures=True)
