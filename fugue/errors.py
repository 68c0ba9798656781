"""The one exception type a user sees: its message is one line, shown without a traceback."""


class FugueError(Exception):
    """A problem the user can fix (bad option, port in use, no master running).

    Raised anywhere below the entry points; `fugue.start` and `fuguectl` print
    `fugue: <message>` on stderr and exit with `status`.
    """

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class ConfigError(FugueError):
    """An option has an unknown name or a value of the wrong type or range."""

    def __init__(self, message):
        super().__init__(message, status=2)
