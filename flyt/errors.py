"""The user-facing errors, so the CLI can print each as a single line, and SIGTERM turned into one."""

import contextlib
import re
import signal
import threading


class FlytError(Exception):
    """Bad input: a flag, a file or a folder that is not what the command needs (exit code 2)."""

    exit_code = 2


def remote_hint(path) -> str:
    """For a path that is not there but looks like a URL or a pipe (``s3://...``, ``gs://...``,
    ``pipe:...``): how to give it, since flyt opens local paths only (never a URL, never a shell command)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", str(path)):  # a scheme, not a drive letter
        return ("; flyt reads local paths only (no URL or pipe: is ever opened): mount the bucket "
                "(s3fs, gcsfuse, ...) and give the mounted path")
    return ""


class StorageError(FlytError):
    """An output that cannot be written: a full disk or quota, a read-only or forbidden folder (exit code 1).
    What was written before is intact; a rerun once there is room completes the job."""

    exit_code = 1


class Preempted(BaseException):
    """Stopped by SIGTERM (a scheduler's pre-emption) with finished work saved (exit code 75, EX_TEMPFAIL,
    which schedulers can requeue on); rerunning the same command continues. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` around one unit's work mistakes it for that unit's
    failure."""

    exit_code = 75


@contextlib.contextmanager
def stop_on_sigterm(message: str):
    """Within the block, SIGTERM raises ``Preempted(message)`` in the main thread: the write in flight is
    abandoned (``atomic_path`` removes its temporary as the exception unwinds), finished outputs stay.
    Elsewhere than the main thread (where no handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Preempted(message)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
