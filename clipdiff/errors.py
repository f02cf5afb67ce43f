"""One exception type for problems a user can fix (bad paths, bad files, bad configs).

Entry points catch :class:`ClipdiffError` and print its message as a single line instead of a traceback.
Messages should name the file or config key involved and say what to do.
"""


class ClipdiffError(Exception):
    """A user-facing error: the message is shown as one line, without a traceback."""
