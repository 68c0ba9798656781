"""fugue's exceptions. Who imports it: any module (it imports nothing of fugue).

FugueError is the one type a user sees: its message is one line, shown without
a traceback. Refused is a command that cannot run now; the master and the
router log it, or send it as the control reply.
"""


def one_line(message):
    """`message` as one line, whatever a value in it holds (a path with a newline, say): \\n, \\x1b, ..."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(message))


def shown(value):
    """A value for a message: as it is if printable, else quoted the way repr quotes it ('a\\nb')."""
    return value if isinstance(value, str) and value.isprintable() else repr(value)


class FugueError(Exception):
    """A problem the user can fix (bad option, port in use, no master running).

    Raised anywhere below the entry points; `fugue.start` and `fuguectl` print
    `fugue: <message>` on stderr and exit with `status`.
    """

    def __init__(self, message, status=1):
        super().__init__(one_line(message))
        self.status = status


class ConfigError(FugueError):
    """An option has an unknown name or a value of the wrong type or range."""

    def __init__(self, message):
        super().__init__(message, status=2)


class Refused(Exception):
    """A command that cannot run now ('reload already in progress'); the text says why."""
