"""The `warmup` option: a new worker calls its own app with `GET PATH` before READY.

Who calls it: the HTTP adapters (wsgi.py, asgi.py, and sockserver.py for
http.server handlers), after the app is loaded (and, for ASGI, after lifespan
startup) and before they accept a connection or say READY. The request never
touches a socket a client could reach: WSGI and ASGI apps are called as
functions, an http.server handler is run on a socketpair.

What it promises: `failure(...)` is None when every path answered below 500,
otherwise one line for the rollback reason that names the path, the status and
the exception: `warmup GET / answered 500: SyntaxError: invalid syntax (views.py,
line 7)`. Frameworks turn an exception into a 500 themselves (Django, Flask) and
log it; `logged_errors()` catches what they log while the request runs, so the
exception is in the reason even then. Host is the first `hostnames` entry, or
the first listener's address (`localhost:PORT` for a wildcard address,
`localhost` for a Unix socket).
"""

import contextlib
import io
import logging
import re
import socket
import sys
import threading
import urllib.parse

from .base import describe_exception


def plan(ctx):
    """(paths, host) for this worker; paths is empty when warmup is off."""
    paths = list(ctx.options.get("warmup") or [])
    names = ctx.options.get("hostnames") or []
    return paths, (names[0] if names else _listener_host(ctx.listeners))


def _listener_host(listeners):
    try:
        addr = listeners[0].getsockname()
    except (IndexError, AttributeError, OSError):
        return "localhost"
    if not isinstance(addr, tuple):
        return "localhost"
    host, port = addr[:2]
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


class Logged:
    """Error records logged (by any logger, propagating or not) while a block runs."""

    def __init__(self):
        self.records = []

    def describe(self):
        """The first logged exception in one line, else the last line of the last error message."""
        for record in self.records:
            if record.exc_info and record.exc_info[1] is not None:
                return describe_exception(record.exc_info[1])
        for record in reversed(self.records):
            text = last_line(record.getMessage())
            if text and text != "Application startup failed. Exiting.":
                return text
        return None


@contextlib.contextmanager
def logged_errors():
    """Collect ERROR records through the record factory, so a logger that does not
    propagate to the root (Django's and uvicorn's may not) is seen too."""
    logged = Logged()
    old = logging.getLogRecordFactory()

    def factory(*args, **kw):
        record = old(*args, **kw)
        if record.levelno >= logging.ERROR:
            logged.records.append(record)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield logged
    finally:
        logging.setLogRecordFactory(old)


def last_line(text):
    """The last non-empty line of `text` (a traceback's is the exception), with the place of
    the innermost `File "...", line N` when the text is a traceback."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        return None
    places = re.findall(r'File "([^"]+)", line (\d+)', str(text))
    where = f" ({places[-1][0].rsplit('/', 1)[-1]}, line {places[-1][1]})" if places else ""
    return lines[-1][:500] + where


def failure(path, status, exc=None, logged=None, errors=""):
    """The reason a warmup request failed, or None if it did not."""
    if exc is None and status is not None and status < 500:
        return None
    why = describe_exception(exc) if exc is not None else (
        (logged.describe() if logged else None) or last_line(errors))
    head = f"warmup GET {path} answered {status}" if status is not None else f"warmup GET {path} failed"
    return f"{head}: {why}" if why else head


def _split(path):
    raw, _, query = path.partition("?")
    return raw, query


def call_wsgi(app, path, host):
    """Run one GET through a WSGI app in this thread; the failure reason or None."""
    raw, query = _split(path)
    name, _, port = host.rpartition(":") if host.rsplit(":", 1)[-1].isdigit() else (host, "", "80")
    errors = io.StringIO()
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "",
        "PATH_INFO": urllib.parse.unquote_to_bytes(raw).decode("latin-1"), "QUERY_STRING": query,
        "SERVER_NAME": name.strip("[]"), "SERVER_PORT": port, "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host, "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "0",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": errors, "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    status = []

    def start_response(line, headers, exc_info=None):
        status[:] = [int(str(line).split()[0])]
        return lambda data: None

    exc = None
    with logged_errors() as logged:
        try:
            result = app(environ, start_response)
            try:
                for _ in result:
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception as e:  # noqa: BLE001 - any failure of the app fails the worker
            exc = e
    # An exception before the response started is what waitress answers with a 500.
    return failure(path, status[0] if status else (500 if exc else None), exc, logged, errors.getvalue())


async def call_asgi(app, path, host, state=None):
    """Run one GET through an ASGI 3 app on the running loop; the failure reason or None."""
    import asyncio

    raw, query = _split(path)
    done = asyncio.Event()
    status = []
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "root_path": "",
        "path": urllib.parse.unquote(raw), "raw_path": raw.encode("latin-1", "replace"),
        "query_string": query.encode("latin-1", "replace"), "headers": [(b"host", host.encode("idna"))],
        "client": ("127.0.0.1", 0), "server": None, "state": dict(state or {}),
    }
    sent_body = []

    async def receive():
        if not sent_body:
            sent_body.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status[:] = [int(message["status"])]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    exc = None
    with logged_errors() as logged:
        try:
            await app(scope, receive, send)
        except Exception as e:  # noqa: BLE001
            exc = e
        finally:
            done.set()
    # An exception before the response started is what uvicorn answers with a 500.
    return failure(path, status[0] if status else (500 if exc else None), exc, logged)


def call_socketserver(server, path, host):
    """Run one GET through an http.server handler on a socketpair; the failure reason or None."""
    ours, theirs = socket.socketpair()
    raised = []

    def handle():
        try:
            server.finish_request(theirs, ("127.0.0.1", 0))
        except Exception as e:  # noqa: BLE001
            raised.append(e)
        finally:
            try:
                theirs.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            theirs.close()

    errors = io.StringIO()
    with logged_errors() as logged, contextlib.redirect_stderr(errors):
        thread = threading.Thread(target=handle, name="fugue-warmup", daemon=True)
        thread.start()
        head = b""
        try:
            ours.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
            while True:
                chunk = ours.recv(65536)
                if not chunk:
                    break
                if len(head) < 1024:
                    head += chunk[:1024]
        except OSError:
            pass
        finally:
            ours.close()
        thread.join()
    m = re.match(rb"HTTP/\d\.\d (\d{3})", head)
    err = errors.getvalue()
    if err:
        sys.stderr.write(err)  # what the handler logged stays in the log
    return failure(path, int(m.group(1)) if m else None, raised[0] if raised else None, logged, err)


def first_failure(ctx, call):
    """`call(path, host)` for each warmup path in order; the first failure reason, or None."""
    paths, host = plan(ctx)
    for path in paths:
        reason = call(path, host)
        if reason:
            return reason
    return None
