"""One exception type for bad user input, so the CLI can print it as a single line."""


class FlytError(Exception):
    """A problem with the user's input (a file, a flag): shown as one line, exit code 2."""
