"""The control socket: fuguectl's way into the master, one more reader in its loop.

A SOCK_SEQPACKET Unix socket, mode 0600, in the master's 0700 run directory;
every connection's SO_PEERCRED uid must be the master's or root. One request
per connection: {"type": "cmd", "cmd": NAME, ...}; the reply is one frame
{"type": "reply", "ok": bool, "text": str, "data": ...}. reload and upgrade
reply when their outcome is known, so `fuguectl reload` can exit non-zero on a
rollback; status replies once every worker has sent fresh counters (or after
STATUS_WAIT seconds, with what it has).
"""

import itertools
import logging
import os
import socket
import time

from . import protocol
from .config import MAX_WORKERS
from .errors import Refused
from .fds import bind_unix_path, connect_unix_path, peer_credentials
from .policy import LIVE, WorkerState
from .status import collect

log = logging.getLogger("fugue")

STATUS_WAIT = 1.0
REQUEST_WAIT = 5.0  # a client must send its request this soon after connecting (fuguectl does at once)
MAX_CLIENTS = 256   # connections being served at once; more wait in the listen backlog
WORKER_ASKS = 4     # fugue.server_status() asks of one worker waiting for their answer
ACCEPT_PAUSE = 0.1  # seconds accepting pauses when the master is out of descriptors
COMMANDS = ("status", "reload", "upgrade", "stop", "scale", "reopen-logs", "pid", "watch", "drain", "undrain")


class ControlServer:
    def __init__(self, master, path):
        self.master = master
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            bind_unix_path(self.sock, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        # A thousand fuguectl/status callers at once wait in the backlog (the kernel caps it at
        # net.core.somaxconn) rather than see EAGAIN; the client retries EAGAIN within its timeout.
        self.sock.listen(socket.SOMAXCONN)
        self.sock.setblocking(False)
        self.clients = {}             # conn -> deadline for its request, or None once it came
        self.worker_asks = {}         # worker pid -> its fugue.server_status() asks not yet answered
        self.worker_round = None      # seq of the STATS round the workers' asks wait on
        self.worker_round_delivers = []
        self.refused_asks = 0
        self.refused_said = 0.0
        self.paused_until = None      # accepting paused: at MAX_CLIENTS (inf) or out of descriptors
        self.accept_failures = 0      # since the last log line about them
        self.accept_said = 0.0
        self._seq = itertools.count(1)
        self.pending_status = {}      # seq -> [deliver(data), waiting pids, deadline]

    def accept(self):
        while True:
            if len(self.clients) >= MAX_CLIENTS:
                self._pause(float("inf"))  # until one is done (drop)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: they wait in the backlog meanwhile
                self._pause(time.monotonic() + ACCEPT_PAUSE)
                self.accept_failures += 1
                if time.monotonic() - self.accept_said >= 10.0:
                    log.warning("control: cannot accept (%s), %d time(s) since the last report; "
                                "pausing %gs", e.strerror, self.accept_failures, ACCEPT_PAUSE)
                    self.accept_said, self.accept_failures = time.monotonic(), 0
                return
            _, uid, _ = peer_credentials(conn)
            if uid not in (0, os.getuid()):
                log.warning("control: refused a connection from uid %d", uid)
                try:  # say why, so fuguectl shows the cause instead of a bare EOF
                    conn.setblocking(False)
                    conn.send(protocol.encode(
                        "reply", ok=False, data=None, refused=True,
                        text=f"permission denied: uid {uid} is not the master's uid ({os.getuid()}) or root"))
                except OSError:
                    pass
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn] = time.monotonic() + REQUEST_WAIT
            self.master.loop.add_reader(conn, lambda c=conn: self.on_request(c))

    def on_request(self, conn):
        try:
            data = conn.recv(protocol.MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        try:
            msg = protocol.decode(data)
        except protocol.ProtocolError as e:
            self.reply(conn, False, f"bad request: {e}")
            return
        self.master.loop.remove_reader(conn)  # one request per connection
        self.clients[conn] = None  # its reply may take as long as a reload does
        self.handle(conn, msg)

    def reply(self, conn, ok, text, data=None):
        if conn not in self.clients:
            return
        try:
            conn.send(protocol.encode("reply", ok=ok, text=text, data=data))
        except OSError:
            pass
        self.drop(conn)

    def drop(self, conn):
        if conn in self.clients:
            del self.clients[conn]
            self.master.loop.remove_reader(conn)
            conn.close()
            if self.paused_until == float("inf"):
                self._resume()

    def _pause(self, until):
        if self.paused_until is None:
            self.master.loop.remove_reader(self.sock)
        self.paused_until = until

    def _resume(self):
        if self.paused_until is not None and self.sock.fileno() >= 0:
            self.paused_until = None
            self.master.loop.add_reader(self.sock, self.accept)

    def handle(self, conn, msg):
        """Run one command; a refusal or a failure is the reply, never the owner's death."""
        cmd = msg.get("cmd")
        try:
            self.dispatch(conn, msg)
        except Refused as e:
            self.reply(conn, False, str(e))
        except Exception as e:  # noqa: BLE001 - a bad request must not take the master down
            log.exception("control command %r failed", cmd)
            self.reply(conn, False, f"{cmd} failed: {e}")

    def dispatch(self, conn, msg):
        """The master's commands; a subclass serves another owner (the router)."""
        m = self.master
        cmd = msg.get("cmd")
        if msg.get("app") is not None:  # `fuguectl reload api` sent to a master, not a router
            raise Refused(f"{cmd} {msg['app']}: this master serves one app; an app name is for a router "
                          "(routed mode)")
        if cmd == "pid":
            self.reply(conn, True, str(os.getpid()), {"pid": os.getpid()})
        elif cmd == "reload":
            m.ask("reload", "fuguectl", waiter=lambda ok, text: self.reply(conn, ok, text))
        elif cmd == "upgrade":
            m.ask("upgrade", "fuguectl", waiter=lambda ok, text: self.reply(conn, ok, text))
        elif cmd == "stop":
            m.begin_stop("quick" if msg.get("quick") else "graceful")
            held = m.drain.describe() if m.stopping is None else None
            text = f"draining for {held['stop_in']:g}s, then stopping" if held and held["stop_in"] else "stopping"
            self.reply(conn, True, text, {"pid": os.getpid()})
        elif cmd in ("drain", "undrain"):
            self.reply(conn, True, m.drain.set_manual(cmd == "drain"))
        elif cmd == "reopen-logs":
            refused = m.reopen_logs()
            self.reply(conn, refused is None, f"cannot reopen logs: {refused}; keeping the old files"
                       if refused else "reopened log files")
        elif cmd == "scale":
            self.reply(conn, *self._scale(msg.get("workers")))
        elif cmd == "watch":
            self.reply(conn, *self._watch(msg.get("on")))
        elif cmd == "status":
            self.begin_status(conn)
        else:
            self.reply(conn, False, f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")

    def _scale(self, value):
        m = self.master
        text = str(value)
        try:
            n = int(text)
        except ValueError:
            return False, f"scale: {value!r} is not N, +N or -N"
        new = m.target_count + n if text.startswith(("+", "-")) else n
        if new < 0:
            return False, f"scale: cannot go below 0 workers (now {m.target_count})"
        if new > MAX_WORKERS:
            return False, f"scale: at most {MAX_WORKERS} workers (asked for {new})"
        m.scale(new)
        return True, f"workers: {new}"

    def _watch(self, on):
        m = self.master
        if m.watcher is None:
            return False, "watch mode is not enabled (start with --watch)"
        if on:
            m.watcher.resume()
        else:
            m.watcher.pause()
        log.info("watch %s", "on" if on else "off")
        return True, f"watch {'on' if on else 'off'}"

    # -- status: ask every worker, answer when all replied ------------------------------

    def begin_status(self, conn):
        """fuguectl status: reply on `conn` once every live worker sent fresh counters."""
        self.fresh_status(lambda data: self.reply(conn, True, "status", data))

    def fresh_status(self, deliver):
        """Ask every live worker for its counters; call deliver(collect()) when all
        have answered, or after STATUS_WAIT seconds with what there is (a worker
        still importing its app cannot answer yet)."""
        m = self.master
        seq = next(self._seq)
        waiting = set()
        for w in m.workers.values():
            # Draining workers too: what they still hold is what an operator asks status for.
            if (w.state in LIVE or w.state is WorkerState.DRAINING) and not w.foreign and m.send(
                    w, protocol.STATS, seq=seq):
                waiting.add(w.pid)
        self.pending_status[seq] = [deliver, waiting, time.monotonic() + STATUS_WAIT]
        self._maybe_finish(seq)
        return seq

    def status_for_worker(self, w, msg):
        """fugue.server_status() in a worker: the same aggregate, sent on its channel.

        Bounded, so that one worker's app cannot keep the master busy (a loop asking for
        status made a reload take 7 s): asks from every worker join one round of STATS
        while it is pending, and a worker with WORKER_ASKS asks unanswered gets None at once
        (what a timed-out fugue.server_status() returns), counted in one log line per 10 s.
        """
        seq = msg.get("seq")
        waiting = self.worker_asks.get(w.pid, 0)
        if waiting >= WORKER_ASKS:
            self.refused_asks += 1
            now = time.monotonic()
            if now - self.refused_said >= 10.0:
                log.warning("%s asks for status faster than it is answered: %d ask(s) refused",
                            w, self.refused_asks)
                self.refused_said, self.refused_asks = now, 0
            self.master.send(w, protocol.STATUS, seq=seq, data=None)
            return
        self.worker_asks[w.pid] = waiting + 1

        def deliver(data):
            left = self.worker_asks.get(w.pid, 1) - 1
            if left > 0:
                self.worker_asks[w.pid] = left
            else:
                self.worker_asks.pop(w.pid, None)
            self.master.send(w, protocol.STATUS, seq=seq, data=data)

        if self.worker_round in self.pending_status:  # join the round under way
            self.worker_round_delivers.append(deliver)
            return
        delivers = self.worker_round_delivers = [deliver]
        self.worker_round = self.fresh_status(lambda data: [d(data) for d in delivers])

    def stats_reply(self, w, msg):
        seq = msg.get("seq")
        entry = self.pending_status.get(seq) if isinstance(seq, int) else None  # workers run app code
        if entry:
            entry[1].discard(w.pid)
            self._maybe_finish(msg.get("seq"))

    def _maybe_finish(self, seq, force=False):
        deliver, waiting, _ = self.pending_status[seq]
        waiting &= set(self.master.workers)
        if waiting and not force:
            return
        del self.pending_status[seq]
        deliver(collect(self.master))

    def deadline(self):
        """The next time the master loop must call us (status waits, HTTP clients)."""
        now = time.monotonic()
        for seq, (_, _, when) in list(self.pending_status.items()):
            if when <= now:
                self._maybe_finish(seq, force=True)
        for conn, when in list(self.clients.items()):
            if when is not None and when <= now:  # connected, and silent: it holds a descriptor
                log.warning("control: closed a connection that sent no request in %gs", REQUEST_WAIT)
                self.drop(conn)
        if self.paused_until is not None and self.paused_until <= now:
            self._resume()
        deadlines = [e[2] for e in self.pending_status.values()]
        if self.paused_until is not None and self.paused_until != float("inf"):
            deadlines.append(self.paused_until)
        deadlines += [when for when in self.clients.values() if when is not None]
        http = getattr(self.master, "status_server", None)
        if http is not None:
            deadlines.append(http.deadline())
        return min((d for d in deadlines if d is not None), default=None)

    def close(self):
        for conn in list(self.clients):
            self.reply(conn, False, "the master is exiting")
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _connect_retrying(sock, path, timeout):
    """connect(2), retrying EAGAIN (the master's backlog is full: it is busy, not gone) until
    `timeout` has passed; a Unix socket with a timeout does not wait for room by itself."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            return connect_unix_path(sock, path)
        except BlockingIOError:
            if deadline is not None and time.monotonic() + pause > deadline:
                raise TimeoutError(f"the master's control socket stayed busy for {timeout:g}s") from None
            time.sleep(pause)  # fuguectl's side: no loop to return to
            pause = min(pause * 2, 0.1)


def request(path, cmd, timeout=None, **fields):
    """fuguectl's side: send one command, wait for its reply (a dict).

    OSError (ENOENT, EACCES, ECONNREFUSED, timeout) is the caller's to explain."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        _connect_retrying(sock, path, timeout)
        try:
            sock.send(protocol.encode("cmd", cmd=cmd, **fields))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once: the reason is waiting to be read
        try:
            data = sock.recv(protocol.MAX_FRAME)
        except ConnectionResetError:
            # The master closed with our request unread (a refusal): Linux reports
            # ECONNRESET once, then the reply it sent before closing is readable.
            data = sock.recv(protocol.MAX_FRAME)
    finally:
        sock.close()
    if not data:
        raise ConnectionError("the master closed the connection without a reply")
    return protocol.decode(data)
