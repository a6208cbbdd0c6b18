"""Pre-emption: Slurm and Kubernetes send SIGTERM, wait a grace period, then SIGKILL.

SIGTERM only sets a flag; the loop looks at it once per step (all ranks agree through one small
all-reduce), so the step in flight finishes, its checkpoint is written and the process exits with
``EXIT_CODE``. A step is never abandoned half-way: under ``torchrun`` the other ranks would wait for
it inside a collective, and a partly applied update could not be saved. While a checkpoint is being
written, SIGINT and SIGTERM wait until the files are complete.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from flyt.errors import Preempted

# EX_TEMPFAIL (sysexits.h): "try again later", what a requeueing job script can test for; neither the
# 143 of a plain SIGTERM death nor the 1 of a failure, nor flyt's 2 for bad input. The per-shard
# commands stop with the same code (``flyt.runner.job``).
EXIT_CODE = Preempted.exit_code


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can handlers be set


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a SIGTERM sent to the whole process group (as Slurm does) must not
    kill a worker under the main process, which still needs batches and ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignal:
    """While entered (``stop_on_sigterm``), SIGTERM records a stop request instead of ending the process."""

    def __init__(self, stop_on_sigterm: bool):
        self.active = stop_on_sigterm and _main_thread()
        self.received: str | None = None  # the name of the signal that asked to stop
        self._previous = None

    def __enter__(self) -> "StopSignal":
        if self.active:
            self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self._previous)

    def _record(self, signum, frame) -> None:  # no I/O here: the main thread may be inside a write
        self.received = self.received or signal.Signals(signum).name

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A checkpoint write is never cut short: SIGINT and SIGTERM arriving meanwhile are held and
        delivered once it is complete (dropped when the run is stopping anyway)."""
        if not _main_thread():
            yield
            return
        pending: list[int] = []
        held = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        for signum in dict.fromkeys(pending):
            if self.received is None:
                signal.raise_signal(signum)  # to the handler that was in place: KeyboardInterrupt, a stop, death
