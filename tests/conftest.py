"""Process-test harness: real masters, real signals, real clients.

`fugue_proc` starts a command as a new session with a unique tag in its
environment; teardown SIGKILLs every process that carries the tag (workers,
daemonized and upgraded masters included), even when the test failed. Waits
are on conditions with deadlines (a log line, a pid file, an HTTP answer),
never bare sleeps.
"""

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps")
PY = sys.executable


def tagged_pids(tag, session=None):
    """Pids of live processes whose environment carries FUGUE_TEST_TAG=tag (or in `session`).

    setproctitle normally reuses the environ area for the title, which would hide
    the tag: the harness sets SPT_NOENV=1 so it leaves the environment alone.
    Zombies are not counted: they hold nothing.
    """
    needle = f"FUGUE_TEST_TAG={tag}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if fields[0] == "Z":
                continue
            if session is not None and int(fields[3]) == session:
                out.append(int(name))
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def wait_for(cond, timeout=15.0, what="condition", interval=0.02):
    """Poll `cond()` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(port, path="/", host="127.0.0.1", timeout=10.0, headers=None, unix=None):
    """(status, body text, headers dict) of one GET on a fresh connection."""
    if unix:
        conn = UnixHTTPConnection(unix, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), dict(resp.getheaders())
    finally:
        conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Proc:
    """A command under test (usually a fugue master) and everything it spawns."""

    def __init__(self, argv, cwd, env, log_path):
        self.argv = argv
        self.cwd = cwd
        self.log_path = log_path
        self.tag = env["FUGUE_TEST_TAG"]
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self._port = None

    # -- observing ---------------------------------------------------------------

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, timeout=15.0, count=1):
        """Wait until `pattern` (a regex) matches `count` times in the log; return the last match."""
        rx = re.compile(pattern)

        def found():
            matches = list(rx.finditer(self.log()))
            return matches[count - 1] if len(matches) >= count else None

        try:
            return wait_for(found, timeout, f"log line /{pattern}/ x{count}")
        except BaseException:
            print(self.log()[-4000:])
            raise

    def count_log(self, pattern):
        return len(re.findall(pattern, self.log()))

    @property
    def port(self):
        if self._port is None:
            m = self.wait_log(r"listening on (?:\[[^\]]*\]|[\d.]+):(\d+)")
            self._port = int(m.group(1))
        return self._port

    def started(self, timeout=20.0):
        self.wait_log(r"started: generation \d+ serving", timeout)
        return self

    def get(self, path="/", **kw):
        return http_get(self.port, path, **kw)

    def body(self, path="/"):
        status, body, _ = self.get(path)
        assert status == 200, body
        return body

    def pids(self):
        return [pid for pid in tagged_pids(self.tag, self.popen.pid) if pid != self.popen.pid
                or self.popen.poll() is None]

    def master_pid(self, pid_file="fugue.pid"):
        path = os.path.join(self.cwd, pid_file)
        text = wait_for(lambda: _read(path), 15, f"pid file {path}")
        return int(text)

    def signal(self, sig, pid=None):
        os.kill(pid or self.master_pid(), sig)

    def wait_exit(self, timeout=20.0):
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.argv} did not exit within {timeout}s\n{self.log()[-3000:]}")

    # -- cleanup -----------------------------------------------------------------

    def kill_all(self):
        for _ in range(3):
            pids = self.pids()
            if self.popen.poll() is None:
                pids.append(self.popen.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.05)
        self._log.close()


def _read(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return text if text.isdigit() else None
    except OSError:
        return None


def record_lines(path):
    """The words of each line an app recorded in `path` (one line per event); [] before the first."""
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


@pytest.fixture
def workdir(tmp_path):
    """A world-readable work directory with the test apps copied in."""
    d = tmp_path / "work"
    d.mkdir()
    for name in os.listdir(APPS):
        if name.endswith(".py"):
            shutil.copy(os.path.join(APPS, name), d / name)
    return d


@pytest.fixture
def fugue_proc(workdir):
    """Start processes under test: fugue_proc([args...], env={...}) -> Proc (cwd = workdir)."""
    procs = []

    def start(argv, env=None, cwd=None, python=PY):
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("INVOCATION_ID", None)  # under systemd the started process would be a keeper
        full_env["PYTHONPATH"] = ROOT
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["FUGUE_TEST_TAG"] = uuid.uuid4().hex
        full_env["SPT_NOENV"] = "1"  # keep the tag readable in /proc/PID/environ
        full_env.update(env or {})
        if argv and argv[0] == "fuguectl":
            argv = [python, "-m", "fugue.ctl"] + list(argv[1:])
        elif argv and argv[0].endswith(".py"):
            argv = [python] + list(argv)
        proc = Proc(argv, str(cwd or workdir), full_env, str(workdir / f"out-{len(procs)}.log"))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill_all()
    reap_orphans()


SYSTEM_PYTHON = "/usr/bin/python3"


def _become_subreaper():
    """Adopt what our masters orphan (PR_SET_CHILD_SUBREAPER) so it can be reaped here.

    pid 1 on these machines does not reap orphans: without this, every worker of a
    killed master would stay a zombie for the life of the machine.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_orphans():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_become_subreaper()


@pytest.fixture
def world_dir():
    """A world-readable copy of fugue and the test apps, for tests that drop to nobody.

    The default python3 lives under /root (mode 0700): a worker running as nobody
    could not even exec it. These tests run Debian's /usr/bin/python3 on this copy.
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs Debian's /usr/bin/python3")
    import tempfile

    d = tempfile.mkdtemp(prefix="fugue-world-")
    os.chmod(d, 0o755)
    shutil.copytree(os.path.join(ROOT, "fugue"), os.path.join(d, "fugue"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in os.listdir(APPS):
        if name.endswith(".py"):
            shutil.copy(os.path.join(APPS, name), os.path.join(d, name))
    for root, dirs, files in os.walk(d):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    tmp = os.path.join(d, "tmp")
    os.mkdir(tmp, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)
