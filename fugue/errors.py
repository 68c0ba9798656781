"""fugue's exceptions. Who imports it: any module (it imports nothing of fugue).

FugueError is the one type a user sees: its message is one line, shown without
a traceback. Refused is a command that cannot run now; the master and the
router log it, or send it as the control reply.
"""


class FugueError(Exception):
    """A problem the user can fix (bad option, port in use, no master running).

    Raised anywhere below the entry points; `fugue.start` and `fuguectl` print
    `fugue: <message>` on stderr and exit with `status`.
    """

    def __init__(self, message, status=1):
        # One line, whatever a value in it holds (a path with a newline, say): \n, \x1b, ...
        super().__init__("".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                                 for c in str(message)))
        self.status = status


class ConfigError(FugueError):
    """An option has an unknown name or a value of the wrong type or range."""

    def __init__(self, message):
        super().__init__(message, status=2)


class Refused(Exception):
    """A command that cannot run now ('reload already in progress'); the text says why."""
