"""The user-facing errors, so the CLI can print each as a single line."""


class FlytError(Exception):
    """Bad input: a flag, a file or a folder that is not what the command needs (exit code 2)."""

    exit_code = 2


class StorageError(FlytError):
    """An output that cannot be written: a full disk or quota, a read-only or forbidden folder (exit code 1).
    What was written before is intact; a rerun once there is room completes the job."""

    exit_code = 1
