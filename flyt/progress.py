"""Progress of long work: a tqdm bar on a terminal, a plain line now and then anywhere else.

A bar redrawn into a log file (Slurm, nohup, CI) fills it with carriage returns; there, a line such as
``flyt train (flyt): 120/300 step (40%), 2.1 step/s, eta 85 s`` is written at most every
``FLYT_PROGRESS_SECONDS`` seconds (default 30), and one more when the work ends.
"""

from __future__ import annotations

import os
import sys
import time

from flyt.errors import FlytError

SECONDS_VARIABLE = "FLYT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             disable: bool = False, file=None, **bar_options):
    """A progress meter writing to ``file`` (default stderr): a tqdm bar if that stream is a terminal.

    ``bar_options`` (``mininterval``, ``unit_scale``...) only shape the terminal bar.
    """
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    **bar_options)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                         every=_seconds())


def write(line: str, file=None) -> None:
    """Print a log line (default stdout) without breaking a bar, and flush it so logs keep their order."""
    from tqdm import tqdm

    file = sys.stdout if file is None else file
    tqdm.write(line, file=file)
    file.flush()


def _is_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def _seconds() -> float:
    raw = os.environ.get(SECONDS_VARIABLE)
    if raw is None or raw.strip() == "":
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise FlytError(f"{SECONDS_VARIABLE}={raw!r}: expected a number of seconds >= 0 between progress lines")
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class PlainProgress:
    """tqdm's small interface (update, set_postfix, write, close, context manager, iteration) as plain lines."""

    write = staticmethod(write)

    def __init__(self, iterable=None, *, total, desc, unit, initial, disable, file, every: float):
        self.iterable, self.desc, self.unit, self.file, self.every = iterable, desc, unit, file, every
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.initial = initial
        self.disable, self.closed, self.postfix = disable, False, ""
        self.started = self.last_line = time.monotonic()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        ending = self.total is not None and self.n >= self.total  # close() says the last line
        if not self.disable and not ending and now - self.last_line >= self.every:
            self.last_line = now
            self._line(now, final=False)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._line(time.monotonic(), final=True)

    def _line(self, now: float, final: bool) -> None:
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if final:
            parts.append(f"after {_duration(elapsed)}")
        elif rate and self.total and self.n < self.total:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        self.file.write(f"{self.desc}: {', '.join(parts)}\n")
        self.file.flush()
