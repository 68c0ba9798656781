"""The master's one wait point: a selectors loop woken by signals and readers.

Signal handlers only record the signal; `signal.set_wakeup_fd` on a
non-blocking socketpair makes the select return, and the owner dispatches the
recorded signals by name after the wait. Nothing logs, sleeps or exits inside a
handler (the trio/asyncio wakeup-socketpair pattern, Unicorn's self-pipe).
"""

import collections
import logging
import selectors
import signal
import socket
import time


class Loop:
    """Readers, recorded signals and a deadline; no threads, no timers of its own."""

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.signals = collections.deque()
        self._installed = []

    def install_signals(self, signums):
        """Record these signals; the previous handlers are restored by close()."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            self._installed.append((signum, signal.signal(signum, self._record)))

    def _record(self, signum, frame):
        self.signals.append(signum)

    def wake(self):
        """Make the current or next wait return at once (safe from a helper thread)."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def add_reader(self, fileobj, callback):
        self._sel.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj):
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def wait(self, deadline):
        """Block until a reader is readable, a signal arrives, or `deadline` (monotonic).

        Ready readers' callbacks run here, one after another.
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            else:
                try:
                    key.data()
                except Exception:  # noqa: BLE001 - one bad reader must not stop the loop
                    logging.getLogger("fugue").exception(
                        "internal error in a reader (please report it); the loop goes on")

    def pop_signals(self):
        out = []
        while self.signals:
            out.append(self.signals.popleft())
        return out

    def close(self):
        for signum, previous in reversed(self._installed):
            signal.signal(signum, previous)
        self._installed = []
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def forget_in_child(self):
        """In a forked child before exec: stop writing signals into the parent's wakeup socket."""
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for signum, _ in self._installed:
            signal.signal(signum, signal.SIG_DFL)
