#!/usr/bin/env python3
"""Exact-counting HTTP/1.1 load generator for the reload benchmarks.

Every request ends in exactly one outcome: a success, or one failure kind
from FAILURE_KINDS. Nothing is retried silently: a failed request is counted,
its connection is dropped and reopened, and the loop goes on. That is what
makes "0 failed" in a benchmark table mean something.

Used two ways:

    load = Load("127.0.0.1", 8000, conns=32, track_bodies=True)
    load.start()                  # event loop in a background thread
    load.mark("HUP 1"); os.kill(master, signal.SIGHUP)
    ...
    result = load.stop()          # a Result: totals, kinds, timeline, marks

    python3 bench/loadgen.py --host 127.0.0.1 --port 8000 --conns 32 --seconds 5
    python3 bench/loadgen.py --selftest

Failure kinds, in the order a request can meet them:

    connect_refused      connect() got ECONNREFUSED (nobody listening)
    connect_error        any other connect() error (ENOENT on a unix path...)
    reset                ECONNRESET/EPIPE while sending or reading a response
    eof_before_response  the server closed a connection after we sent the
                         request and before 0 bytes of the response: on a
                         kept-alive connection this is the keep-alive race
                         (Result.eof_before_response_fresh counts the ones
                         that happened on a brand-new connection instead)
    eof_mid_response     EOF after part of the response
    timeout              connect + request + response took over `timeout` s
    bad_status           a complete response whose status is not 2xx
    bad_response         bytes that do not parse as an HTTP/1.x response

Not failures: a response with "Connection: close" (or HTTP/1.0 without
keep-alive), and a server closing a kept-alive connection while it is idle,
if that close has reached us before the next request is written. Both make
the connection reconnect, counted in Result.reconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import socket
import sys
import threading
import time
from typing import Callable, Optional

FAILURE_KINDS = (
    "connect_refused",
    "connect_error",
    "reset",
    "eof_before_response",
    "eof_mid_response",
    "timeout",
    "bad_status",
    "bad_response",
)

BUCKET_S = 0.1

# After a failed connect, a connection waits this long before trying again.
# Without it, 32 loops against a closed port spin at full speed, count
# hundreds of thousands of refusals and steal the CPU (2 cores here) that the
# server needs to come back. Refusals therefore count attempts at <= 100/s
# per connection; the timeline, not the count, says how long the port was shut.
CONNECT_RETRY_PAUSE_S = 0.01

_BODY_LINE_MAX = 200


class RequestFailed(Exception):
    """One request ended in failure `kind` (one of FAILURE_KINDS)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclasses.dataclass
class Bucket:
    """Outcomes completed during [t, t + BUCKET_S) seconds after the start."""

    t: float
    ok: int = 0
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


@dataclasses.dataclass
class Result:
    """What one load run saw. Times are seconds since Load.start()."""

    duration: float
    conns: int
    ok: int
    failures: collections.Counter
    timeline: list
    marks: list
    bodies: collections.Counter
    body_first_seen: dict
    body_last_seen: dict
    latencies: list
    reconnects: int
    eof_before_response_fresh: int
    failure_samples: dict
    failure_first_seen: dict
    failure_last_seen: dict

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def requests(self) -> int:
        return self.ok + self.failed

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration if self.duration > 0 else 0.0

    def latency_ms(self, quantile: float) -> Optional[float]:
        """Latency of successful requests at `quantile` (0..1), in ms."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, int(quantile * len(ordered)))
        return ordered[index] * 1000.0

    def failures_text(self) -> str:
        """'0', or 'eof_before_response=3 reset=1' in FAILURE_KINDS order."""
        parts = [f"{k}={self.failures[k]}" for k in FAILURE_KINDS if self.failures[k]]
        return " ".join(parts) if parts else "0"

    def failure_window(self) -> Optional[tuple]:
        """(first, last) time any request failed, or None if none did."""
        if not self.failure_first_seen:
            return None
        return min(self.failure_first_seen.values()), max(self.failure_last_seen.values())

    def zero_ok_spans(self) -> list:
        """(start, end) seconds of runs of buckets with no success at all."""
        spans, start = [], None
        for bucket in self.timeline:
            if bucket.ok == 0 and start is None:
                start = bucket.t
            elif bucket.ok and start is not None:
                spans.append((start, bucket.t))
                start = None
        if start is not None:
            spans.append((start, self.duration))
        return spans

    def summary(self) -> str:
        """A few human-readable lines, as the CLI prints them."""
        p50, p99 = self.latency_ms(0.5), self.latency_ms(0.99)
        lines = [
            f"duration   {self.duration:.2f} s with {self.conns} connections",
            f"requests   {self.requests} ok {self.ok} failed {self.failed}"
            f" ({self.requests_per_s:.0f} ok/s, {self.reconnects} reconnects)",
            f"failures   {self.failures_text()}",
        ]
        if p50 is not None:
            lines.append(f"latency    p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        if self.eof_before_response_fresh:
            lines.append(f"           of which eof_before_response on a fresh "
                         f"connection: {self.eof_before_response_fresh}")
        for label_t, label in self.marks:
            lines.append(f"mark       {label_t:7.3f} s  {label}")
        for body, count in self.bodies.most_common(10):
            lines.append(f"body       {count:8d}  {body}")
        for kind, sample in self.failure_samples.items():
            lines.append(f"sample     {kind} ({self.failure_first_seen[kind]:.3f}"
                         f"..{self.failure_last_seen[kind]:.3f} s): {sample}")
        return "\n".join(lines)


class _Recorder:
    """Counters shared by the loop thread (writer) and callers (readers)."""

    def __init__(self, t0: float, track_bodies: bool):
        self.t0 = t0
        self.track_bodies = track_bodies
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = collections.Counter()
        self.buckets: dict[int, Bucket] = {}
        self.marks: list = []
        self.bodies = collections.Counter()
        self.body_first_seen: dict[str, float] = {}
        self.body_last_seen: dict[str, float] = {}
        self.latencies: list = []
        self.reconnects = 0
        self.eof_before_response_fresh = 0
        self.failure_samples: dict[str, str] = {}
        self.failure_first_seen: dict[str, float] = {}
        self.failure_last_seen: dict[str, float] = {}

    def _bucket(self, now: float) -> Bucket:
        index = int((now - self.t0) / BUCKET_S)
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = Bucket(t=round(index * BUCKET_S, 6))
        return bucket

    def success(self, now: float, latency: float, first_line: Optional[str]) -> None:
        with self.lock:
            self.ok += 1
            self._bucket(now).ok += 1
            self.latencies.append(latency)
            if first_line is not None:
                self.bodies[first_line] += 1
                since = now - self.t0
                self.body_first_seen.setdefault(first_line, since)
                self.body_last_seen[first_line] = since

    def failure(self, now: float, kind: str, detail: str, fresh: bool) -> None:
        with self.lock:
            self.failures[kind] += 1
            self._bucket(now).failures[kind] += 1
            self.failure_samples.setdefault(kind, detail)
            self.failure_first_seen.setdefault(kind, now - self.t0)
            self.failure_last_seen[kind] = now - self.t0
            if kind == "eof_before_response" and fresh:
                self.eof_before_response_fresh += 1


class Load:
    """`conns` HTTP/1.1 client loops against one server, counted exactly.

    Called by benchmarks (start/mark/stop from the main thread while it sends
    signals) and by the CLI. The event loop runs in a daemon thread owned by
    this object; every public method is safe to call from any other thread.
    """

    def __init__(self, host: str, port: int, conns: int = 32, path: str = "/",
                 keepalive: bool = True, unix_path: Optional[str] = None,
                 timeout: float = 5.0, *, track_bodies: bool = False):
        self.host, self.port, self.conns, self.path = host, port, conns, path
        self.keepalive, self.unix_path, self.timeout = keepalive, unix_path, timeout
        self.track_bodies = track_bodies
        connection = "keep-alive" if keepalive else "close"
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"User-Agent: fugue-loadgen\r\nConnection: {connection}\r\n\r\n"
                         ).encode("ascii")
        self._rec: Optional[_Recorder] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._started = threading.Event()
        self._stopped_at: Optional[float] = None
        self._result: Optional[Result] = None
        self._crash: Optional[BaseException] = None

    # -- public API ---------------------------------------------------------

    def start(self) -> "Load":
        """Start the loops in a background thread; returns once they run."""
        if self._thread is not None:
            raise RuntimeError("Load already started")
        self._rec = _Recorder(time.monotonic(), self.track_bodies)
        self._thread = threading.Thread(target=self._thread_main, name="loadgen", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._crash is not None:
            raise self._crash
        return self

    def stop(self) -> Result:
        """Stop every loop, wait for the thread and return the Result.

        Requests still in flight at this moment are abandoned uncounted: they
        neither succeeded nor failed inside the measured window.
        """
        if self._thread is None:
            raise RuntimeError("Load not started")
        if self._result is None:
            self._stopped_at = time.monotonic()
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join()
            if self._crash is not None:
                raise self._crash
            self._result = self._snapshot(self._stopped_at)
        return self._result

    def run(self, seconds: float) -> Result:
        """Start, run for `seconds`, stop: the CLI's whole job."""
        self.start()
        time.sleep(seconds)  # the measurement window itself, not a wait for a condition
        return self.stop()

    def mark(self, label: str) -> float:
        """Record an event (e.g. "HUP 1") at the current time; returns that time."""
        t = self.elapsed()
        with self._rec.lock:
            self._rec.marks.append((t, label))
        return t

    def elapsed(self) -> float:
        """Seconds since start(), on the clock every Result time uses."""
        return time.monotonic() - self._rec.t0

    def snapshot(self) -> Result:
        """A Result of everything counted so far, while the load goes on."""
        return self._snapshot(time.monotonic())

    def first_seen(self, predicate: Callable[[str], bool]) -> Optional[float]:
        """Earliest time a body first line matching `predicate` was answered.

        Needs track_bodies=True. Benchmarks poll this to see when a new
        generation started answering.
        """
        with self._rec.lock:
            times = [t for body, t in self._rec.body_first_seen.items() if predicate(body)]
        return min(times) if times else None

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _snapshot(self, now: float) -> Result:
        rec = self._rec
        with rec.lock:
            timeline = [dataclasses.replace(b, failures=collections.Counter(b.failures))
                        for _, b in sorted(rec.buckets.items())]
            return Result(
                duration=now - rec.t0, conns=self.conns, ok=rec.ok,
                failures=collections.Counter(rec.failures), timeline=_fill_gaps(timeline),
                marks=list(rec.marks), bodies=collections.Counter(rec.bodies),
                body_first_seen=dict(rec.body_first_seen),
                body_last_seen=dict(rec.body_last_seen), latencies=list(rec.latencies),
                reconnects=rec.reconnects,
                eof_before_response_fresh=rec.eof_before_response_fresh,
                failure_samples=dict(rec.failure_samples),
                failure_first_seen=dict(rec.failure_first_seen),
                failure_last_seen=dict(rec.failure_last_seen))

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the caller by start()/stop()
            self._crash = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        tasks = [asyncio.create_task(self._connection_loop()) for _ in range(self.conns)]
        self._started.set()
        await self._stop_event.wait()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError):
                raise outcome

    async def _connect(self):
        if self.unix_path is not None:
            return await asyncio.open_unix_connection(self.unix_path)
        return await asyncio.open_connection(self.host, self.port)

    async def _connection_loop(self) -> None:
        """One client connection: request, response, count, forever."""
        rec = self._rec
        reader = writer = None
        served_on_conn = 0
        try:
            while True:
                if writer is not None and (reader.at_eof() or writer.is_closing()):
                    # The server closed an idle kept-alive connection and we saw
                    # it before writing: a clean close, not a failure.
                    _close(writer)
                    writer = None
                    rec.reconnects += 1
                start = time.monotonic()
                try:
                    async with asyncio.timeout(self.timeout):
                        if writer is None:
                            reader, writer = await self._open()
                            served_on_conn = 0
                        keep, first_line = await self._exchange(reader, writer)
                except RequestFailed as failure:
                    rec.failure(time.monotonic(), failure.kind, failure.detail,
                                fresh=served_on_conn == 0)
                    if writer is not None:
                        _close(writer)
                    writer = None
                    if failure.kind in ("connect_refused", "connect_error"):
                        await asyncio.sleep(CONNECT_RETRY_PAUSE_S)
                    continue
                except TimeoutError:
                    rec.failure(time.monotonic(), "timeout",
                                f"no full response in {self.timeout} s",
                                fresh=served_on_conn == 0)
                    if writer is not None:
                        _close(writer)
                    writer = None
                    continue
                now = time.monotonic()
                rec.success(now, now - start, first_line)
                served_on_conn += 1
                if not keep:
                    _close(writer)
                    writer = None
                    rec.reconnects += 1
        finally:
            if writer is not None:
                _close(writer)

    async def _open(self):
        try:
            return await self._connect()
        except ConnectionRefusedError as exc:
            raise RequestFailed("connect_refused", str(exc)) from None
        except OSError as exc:
            raise RequestFailed("connect_error", str(exc)) from None

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Send one GET and read its whole response.

        Returns (connection reusable?, first body line or None); raises
        RequestFailed with the kind of failure.
        """
        try:
            writer.write(self._request)
            await writer.drain()
            return await self._read_response(reader)
        except OSError as exc:
            # ECONNRESET, EPIPE, ECONNABORTED in practice; anything else the
            # socket reports mid-exchange is the same story for the client.
            raise RequestFailed("reset", f"{type(exc).__name__}: {exc}") from None

    async def _read_response(self, reader: asyncio.StreamReader):
        status_line = await _readline(reader, first=True)
        try:
            version, status_text = status_line.split(b" ", 2)[:2]
            status = int(status_text)
        except ValueError:
            raise RequestFailed("bad_response", f"status line {status_line[:80]!r}") from None
        if not version.startswith(b"HTTP/1.") or not 100 <= status <= 599:
            raise RequestFailed("bad_response", f"status line {status_line[:80]!r}")
        headers = {}
        while True:
            line = await _readline(reader)
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise RequestFailed("bad_response", f"header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        body, closes = await self._read_body(reader, status, headers)
        connection = headers.get(b"connection", b"").lower()
        keep = self.keepalive and not closes and (
            b"close" not in connection
            and (version != b"HTTP/1.0" or b"keep-alive" in connection))
        if not 200 <= status <= 299:
            raise RequestFailed("bad_status", f"HTTP {status}")
        first_line = None
        if self.track_bodies:
            first_line = body.split(b"\n", 1)[0].strip()[:_BODY_LINE_MAX].decode(
                "utf-8", "replace")
        return keep, first_line

    async def _read_body(self, reader, status, headers):
        """Returns (body, connection must close) per RFC 9112 section 6.3."""
        if 100 <= status < 200 or status in (204, 304):
            return b"", False
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return await _read_chunked(reader), False
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise RequestFailed("bad_response", f"content-length {length!r}") from None
            try:
                return await reader.readexactly(size), False
            except asyncio.IncompleteReadError as exc:
                raise RequestFailed("eof_mid_response",
                                    f"body {len(exc.partial)}/{size} bytes") from None
        # No framing: the body runs to EOF and the connection is spent.
        return await reader.read(), True


async def _readline(reader: asyncio.StreamReader, first: bool = False) -> bytes:
    """One CRLF line of the head; EOF classified by how much had arrived."""
    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError):
        raise RequestFailed("bad_response", "line over 64 KiB") from None
    if not line:
        if first:
            raise RequestFailed("eof_before_response", "closed before the status line")
        raise RequestFailed("eof_mid_response", "closed inside the header")
    if not line.endswith(b"\n"):
        raise RequestFailed("eof_mid_response", f"closed inside {line[:40]!r}")
    return line


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await _readline(reader)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise RequestFailed("bad_response", f"chunk size {size_line[:40]!r}") from None
        if size == 0:
            while (await _readline(reader)) not in (b"\r\n", b"\n"):
                pass  # trailer fields
            return b"".join(parts)
        try:
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise RequestFailed("eof_mid_response", "closed inside a chunk") from None


def _close(writer: asyncio.StreamWriter) -> None:
    # abort(), not close(): we never leave unsent data behind, so there is
    # nothing to flush and no reason to wait for the transport.
    with contextlib.suppress(Exception):
        writer.transport.abort()


def _fill_gaps(timeline: list) -> list:
    """Insert empty buckets so the timeline has one bucket per 100 ms."""
    if not timeline:
        return []
    by_index = {round(b.t / BUCKET_S): b for b in timeline}
    last = max(by_index)
    return [by_index.get(i) or Bucket(t=round(i * BUCKET_S, 6)) for i in range(last + 1)]


# -- self test ----------------------------------------------------------------

class _TinyServer:
    """In-process asyncio HTTP/1.1 server for --selftest, in its own thread.

    mode "keepalive":  keeps connections open; alternates Content-Length and
                       chunked bodies so both parsers are exercised.
    mode "close":      answers with "Connection: close" and closes: reconnects,
                       never failures.
    mode "rude":       closes every connection right after each response
                       WITHOUT saying "Connection: close": the keep-alive race
                       on every second request of a connection.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.port = 0
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name=f"tiny-{mode}", daemon=True)

    def __enter__(self):
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=128)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _serve(self, reader, writer):
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                served += 1
                body = f"tiny {self.mode} answer {served}\n".encode()
                if self.mode == "close":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
                elif served % 2:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                else:
                    half = len(body) // 2
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                                 % (half, body[:half], len(body) - half, body[half:]))
                await writer.drain()
                if self.mode in ("close", "rude"):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def selftest(seconds: float = 2.0) -> int:
    """Prove the counting: 0 failures against a well-behaved server, clean
    reconnects against "Connection: close", and eof_before_response (and
    nothing else) against a server that closes kept-alive connections."""
    with _TinyServer("keepalive") as server:
        result = Load("127.0.0.1", server.port, conns=32, track_bodies=True).run(seconds)
    print("== keep-alive server\n" + result.summary())
    assert result.ok > 0 and result.failed == 0, result.failures
    assert result.reconnects == 0, result.reconnects
    assert any("answer 2" in b for b in result.bodies), "chunked bodies not parsed"

    with _TinyServer("close") as server:
        result = Load("127.0.0.1", server.port, conns=32).run(seconds / 2)
    print("== Connection: close server\n" + result.summary())
    assert result.ok > 0 and result.failed == 0, result.failures
    assert result.reconnects >= result.ok - 32, (result.reconnects, result.ok)

    with _TinyServer("rude") as server:
        result = Load("127.0.0.1", server.port, conns=32).run(seconds / 2)
    print("== server closing kept-alive connections after each response\n"
          + result.summary())
    assert result.ok > 0, result.ok
    assert result.failures["eof_before_response"] > 0, result.failures
    others = {k: v for k, v in result.failures.items() if k != "eof_before_response"}
    # A request written after the server's FIN may be answered by an RST
    # instead, which is counted as "reset": same race, other symptom.
    assert set(others) <= {"reset"}, others

    port = _closed_port()
    result = Load("127.0.0.1", port, conns=4).run(0.3)
    print("== nobody listening\n" + result.summary())
    assert result.ok == 0 and set(result.failures) == {"connect_refused"}, result.failures
    print("selftest: 4 passed, 0 failed")
    return 0


def _closed_port() -> int:
    """A port that nobody listens on (bound, never listened, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--unix", dest="unix_path", help="connect to this unix socket instead")
    parser.add_argument("--path", default="/")
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--no-keepalive", dest="keepalive", action="store_false")
    parser.add_argument("--bodies", action="store_true", help="count body first lines")
    parser.add_argument("--selftest", action="store_true",
                        help="check the counting against in-process servers and exit")
    args = parser.parse_args(argv)
    if args.selftest:
        return selftest()
    load = Load(args.host, args.port, conns=args.conns, path=args.path,
                keepalive=args.keepalive, unix_path=args.unix_path,
                timeout=args.timeout, track_bodies=args.bodies)
    result = load.run(args.seconds)
    print(result.summary())
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
