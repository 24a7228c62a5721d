"""Run independent jobs in spawned worker processes, results in the jobs' order (the trainers'
case preparation)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

__all__ = ["ordered_results", "sources_in_order", "worker_count"]


def worker_count(workers: int, jobs: int) -> int:
    """The processes to use: ``workers`` (0: one per CPU core), at least 1, at most one per job."""
    return max(1, min(int(workers) if workers else (os.cpu_count() or 1), jobs))


@contextmanager
def ordered_results(fn: Callable, jobs: Sequence[tuple], workers: int = 1) -> Iterator[Iterator]:
    """Context yielding an iterator over ``fn(*job)`` for each job, in the jobs' order.

    With one worker the jobs run lazily in this process; with more, all are submitted to a pool of
    spawned processes (``fn`` must be a top-level function and its arguments picklable). Leaving the
    context early (an error, Ctrl-C) cancels the jobs not yet started.
    """
    n = worker_count(workers, len(jobs))
    if n == 1:
        yield (fn(*job) for job in jobs)
        return
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures: List = [pool.submit(fn, *job) for job in jobs]
        yield (f.result() for f in futures)
    finally:
        pool.shutdown(cancel_futures=True)


def sources_in_order(sources: Sequence[dict], jobs_of: Callable[[dict], List[tuple]], fn: Callable,
                     workers: int = 1) -> Iterator[Tuple[dict, Optional[tuple], Any]]:
    """A training config's sources in its order: ``(source, job, fn(*job))`` for each job of a generated
    source (``"synthetic"`` in it; its jobs from ``jobs_of``, run in ``workers`` processes), and
    ``(source, None, None)`` for each other source, which the caller loads itself."""
    jobs = [job for src in sources if "synthetic" in src for job in jobs_of(src)]
    with ordered_results(fn, jobs, workers) as results:
        for src in sources:
            if "synthetic" not in src:
                yield src, None, None
                continue
            for job in jobs_of(src):
                yield src, job, next(results)
