"""Running a job's units on this machine: in this process, in threads, or in worker processes."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from typing import Iterator

from flyt.runner.job import Job, Unit

_WORKER: dict = {}  # in a worker process: its job and the job's per-worker state


class InProcess:
    """Units in this process (``workers`` <= 1), in ``workers`` threads sharing one ``setup`` (numpy and
    pyarrow release the GIL, so I/O-bound units overlap), or in ``workers`` processes, each with its own
    ``setup``. Results arrive as units finish; a dead worker process fails its units, not the run.
    ``process`` workers are spawned (safe where torch has started threads); ``fork`` ones start at once,
    for torch-free jobs."""

    def __init__(self, workers: int = 1, kind: str = "thread"):
        if kind not in ("thread", "process", "fork"):
            raise ValueError(f"kind must be 'thread', 'process' or 'fork', not {kind!r}")
        self.workers, self.kind = max(1, int(workers)), kind

    def run(self, job: Job, units: list[Unit]) -> Iterator[tuple[Unit, dict | BaseException]]:
        if not units:
            return
        workers = min(self.workers, len(units))
        if workers == 1:
            yield from job.run_many(units, job.setup())
            return
        if self.kind == "thread":
            state = job.setup()
            pool = ThreadPoolExecutor(workers)
            submit = lambda unit: pool.submit(_one, job, unit, state)  # noqa: E731
        else:
            context = get_context("fork" if self.kind == "fork" else "spawn")
            pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(job,))
            submit = lambda unit: pool.submit(_in_worker, unit)  # noqa: E731
        with pool:
            queue = list(reversed(units))
            running = {}
            try:
                while queue or running:
                    while queue and len(running) < 2 * workers:  # a short queue: a stop cancels little work
                        unit = queue.pop()
                        running[submit(unit)] = unit
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        unit = running.pop(future)
                        try:
                            yield unit, future.result()
                        except Exception as exc:  # the unit's error, or BrokenProcessPool if its worker died
                            yield unit, exc
            finally:
                pool.shutdown(cancel_futures=True)


def _one(job: Job, unit: Unit, state) -> dict:
    [(_, result)] = list(job.run_many([unit], state))
    if isinstance(result, BaseException):
        raise result
    return result


def _start_worker(job: Job) -> None:
    _WORKER["job"], _WORKER["state"] = job, job.setup()


def _in_worker(unit: Unit) -> dict:
    return _one(_WORKER["job"], unit, _WORKER["state"])
