"""The user-facing errors, so the CLI can print each as a single line."""


class FlytError(Exception):
    """Bad input: a flag, a file or a folder that is not what the command needs (exit code 2)."""

    exit_code = 2


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
