"""Run independent jobs in spawned worker processes, results in the jobs' order (the trainers'
case preparation)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, List, Sequence

__all__ = ["ordered_results", "worker_count"]


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
