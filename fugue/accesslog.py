"""The access log: one line per HTTP request, written by the worker that served it.

Who calls it: the worker (Runtime) makes one AccessLog when the `access_log` option is
set and hands it to the adapters as `ctx.access`; the http.server, WSGI and ASGI adapters
call `request(...)` once a response is done; the worker calls `reopen()` on the master's
REOPEN (USR1, `fuguectl reopen-logs`).

What it promises: gunicorn's format atoms (`%(h)s %(t)s "%(r)s" %(s)s %(b)s ...`, with
gunicorn's default format), or with log_format = "json" one JSON object per line. Each
line is one write(2) on an O_APPEND descriptor: no lock between the handler threads, no
master in the path, and lines of several workers never interleave in the file. A write
that fails (full disk) is counted and dropped, never raised into a request. Values are
escaped: a client cannot start a line of its own with a newline in a header.
"""

import base64
import binascii
import datetime
import json
import logging
import os
import time

from .daemon import journal_stream_is

log = logging.getLogger("fugue")

# gunicorn's default access_log_format.
DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'

# The atoms, as gunicorn documents them (fugue(5) and README list the same).
ATOMS = {
    "h": "remote address", "l": "'-'", "u": "user name (basic auth)", "t": "date of the request",
    "r": "status line (GET /path?q HTTP/1.1)", "m": "method", "U": "URL path", "q": "query string",
    "H": "protocol", "s": "status", "B": "response length", "b": "response length or '-'",
    "f": "referer", "a": "user agent", "T": "request time in seconds", "M": "in milliseconds",
    "D": "in microseconds", "L": "in decimal seconds", "p": "process id", "{header}i": "request header",
    "{header}o": "response header", "{variable}e": "environment variable",
}


def _clean(value):
    """A value safe on one log line: control characters and quotes escaped."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c not in '"\\' else
                   ("\\" + c if c in '"\\' else c.encode("unicode_escape").decode("ascii")) for c in text)


class Atoms(dict):
    """gunicorn's SafeAtoms: `%({name}i)s` request and `%({name}o)s` response headers,
    `%({name}e)s` environment variables; anything unknown is '-'."""

    def __init__(self, atoms, request_headers, response_headers):
        super().__init__(atoms)
        self.request_headers = request_headers
        self.response_headers = response_headers

    def __missing__(self, key):
        if key.startswith("{") and len(key) > 3 and key[-2] == "}":
            name, kind = key[1:-2].lower(), key[-1]
            value = (self.request_headers.get(name) if kind == "i" else
                     self.response_headers.get(name) if kind == "o" else
                     os.environ.get(key[1:-2]) if kind == "e" else None)
            return _clean(value) if value is not None else "-"
        return "-"


def basic_auth_user(authorization):
    """The user name of a Basic Authorization header, else None."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(authorization[6:].strip()).decode("utf-8", "replace").split(":", 1)[0] or None
    except (binascii.Error, ValueError):
        return None


class AccessLog:
    """One worker's access log: `target` is an absolute path, or '-' for stdout."""

    def __init__(self, target, fmt=None, json_lines=False, fields=None):
        self.target = target
        self.format = fmt or DEFAULT_FORMAT
        self.json = json_lines
        self.fields = dict(fields or {})   # worker, generation (JSON lines)
        self.fd = None
        self.lost = 0
        self.prefix = b""
        self._failed = False

    def open(self):
        """Open the target; FugueError (one line) if it cannot be."""
        from .daemon import open_log

        self.fd = 1 if self.target == "-" else open_log(self.target)
        self.prefix = b"<6>" if journal_stream_is(self.fd) else b""

    def reopen(self):
        """By name, as logrotate expects; a refused reopen keeps the old file, said once."""
        from .errors import FugueError

        if self.target != "-":
            try:
                from .daemon import open_log

                fd = open_log(self.target)
            except FugueError as e:
                if not self._failed:
                    log.error("cannot reopen the access log: %s; keeping the old file", e)
                self._failed = True
                return
            old, self.fd = self.fd, fd
            if old is not None and old > 2:
                os.close(old)
        self._failed = False
        self.prefix = b"<6>" if journal_stream_is(self.fd) else b""

    def close(self):
        if self.fd is not None and self.fd > 2:
            os.close(self.fd)
        self.fd = None

    def request(self, *, remote, method, path, query, protocol, status, length, started, wall,
                request_headers, response_headers):
        """Log one finished request. `request_headers`/`response_headers`: {lowercase name: str};
        `started`: time.monotonic() when it began, `wall`: time.time() then; `length`: body bytes."""
        duration = max(0.0, time.monotonic() - started)
        status = int(status) if str(status).isdigit() else status
        user = basic_auth_user(request_headers.get("authorization"))
        if self.json:
            record = {"time": datetime.datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds"),
                      "type": "access", "pid": os.getpid(), **self.fields, "remote": remote, "user": user,
                      "method": method, "path": path, "query": query, "protocol": protocol,
                      "status": status, "bytes": length, "referer": request_headers.get("referer"),
                      "user_agent": request_headers.get("user-agent"),
                      "duration_ms": round(duration * 1000, 3)}
            line = json.dumps(record, ensure_ascii=True, default=str)
        else:
            target = f"{path}?{query}" if query else path
            atoms = {
                "h": remote or "-", "l": "-", "u": user or "-",
                "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(wall)),
                "r": f"{method} {target} {protocol}", "m": method, "U": path, "q": query, "H": protocol,
                "s": status, "B": length, "b": length if length else "-",
                "f": request_headers.get("referer") or "-", "a": request_headers.get("user-agent") or "-",
                "T": int(duration), "M": int(duration * 1000), "D": int(duration * 1_000_000),
                "L": f"{duration:.6f}", "p": f"<{os.getpid()}>",
            }
            atoms = {k: _clean(v) for k, v in atoms.items()}
            try:
                line = self.format % Atoms(atoms, request_headers, response_headers)
            except (TypeError, ValueError) as e:  # checked at start; a %d atom on a '-' value
                line = f"access log format error: {e}"
        self.write(self.prefix + line.encode("utf-8", "replace") + b"\n")

    def write(self, data):
        try:
            done = os.write(self.fd, data)
            if done < len(data):  # a pipe or the journal's socket took part of it
                os.write(self.fd, data[done:])
        except OSError:
            self.lost += 1


def prepare_for_workers(path, uid, gid):
    """Create the access log for workers that run as another user, as gunicorn gives its logs
    to its workers' user: the master (root) creates `path` if it does not exist yet (refusing
    links and directories others could rearrange: fds.open_safely) and hands it to uid/gid.
    An existing file is left as it is (its owner decided). FugueError (one line) on failure."""
    if path in (None, "-") or (uid is None and gid is None) or os.path.lexists(path):
        return
    from .daemon import open_log

    fd = open_log(path)
    try:
        if os.fstat(fd).st_size == 0:  # ours: just created (or empty); never chown someone's log
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def check_format(fmt):
    """ConfigError unless `fmt` formats a request (a typo such as %(s) without s is caught at start)."""
    from .errors import ConfigError

    sample = Atoms({k: "-" for k in ATOMS if not k.startswith("{")}, {}, {})
    try:
        fmt % sample
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"access_log_format {fmt!r}: {e} (atoms look like %(h)s)") from None


def headers_of(pairs):
    """{lowercase name: value} from (name, value) pairs of str or bytes (latin-1)."""
    out = {}
    for name, value in pairs:
        if isinstance(name, bytes):
            name, value = name.decode("latin-1"), value.decode("latin-1")
        out[name.lower()] = value
    return out
