"""The servers the overhead, footprint and chaos benchmarks put side by side.

    with tempfile.TemporaryDirectory() as tmp, FugueServer(tmp, workers=2) as f:
        f.start()                 # returns once "started: generation 1 serving"
        ... f.port, f.master, f.worker_pids(), f.ready_pids(), f.answers()

    FugueServer      fuguectl start --app MODULE:ATTR (the adapter picks waitress
                     for WSGI, uvicorn for ASGI), bound to 127.0.0.1:0
    GunicornServer   gunicorn_side.Gunicorn with a worker class, timeouts and a
                     post_worker_init hook that logs "bench: worker PID initialized"
    BareServer       bench/bare_serve.py: the same server fugue runs in its
                     workers, bound directly, N forked copies on one socket
    UvicornMulti     uvicorn --workers N (uvicorn's own supervisor)

Every one of them copies bench/apps/*.py into its temporary directory, logs
to a file there, runs in its own process group, answers the same duck-typed
calls, and is killed by group in close() (also on __exit__). Readiness is a
log line each server writes itself (fugue's READY, gunicorn's post_worker_init,
uvicorn's "Application startup complete") plus one answered request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

try:  # run as a script (python3 bench/x.py) or imported as bench.*
    import gunicorn_side
    import proctree
except ModuleNotFoundError as e:
    if e.name not in ("gunicorn_side", "proctree"):
        raise  # a third-party module (matplotlib, via plot): the script says what to install
    from bench import gunicorn_side, proctree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"
BOOT_TIMEOUT_S = 30.0


def _copy_apps(app_dir: Path) -> None:
    app_dir.mkdir(exist_ok=True)
    for source in APPS.glob("*.py"):
        shutil.copyfile(source, app_dir / source.name)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def descendants(pid: int) -> set:
    """Live descendants of `pid` (children, their children, ...)."""
    found, todo = set(), [pid]
    while todo:
        for child in proctree.children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tree_cpu_s(master: int) -> float:
    """CPU seconds (user + system) used so far by `master` and its live descendants, with
    what their reaped children left them (cutime, cstime: /proc/PID/stat fields 14-17).

    The tree, not the process group: fugue's workers lead process groups of their own.
    """
    ticks = 0
    for pid in {master} | descendants(master):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by one process; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ctxt_switches(pid: int) -> int:
    """Voluntary + nonvoluntary context switches of every thread of `pid`.

    A process that sleeps in one wait switches out once per wake-up, so the
    delta over a window counts its wake-ups (plus preemptions while it ran).
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def connect_refused(port: int) -> bool:
    """True if nothing listens on the port any more (ECONNREFUSED)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False


class _Proc:
    """Shared plumbing: a work directory, a log file, Popens killed by group."""

    name = "?"

    def __init__(self, workdir: str, workers: int, env: Optional[dict] = None):
        self.dir = Path(workdir)
        self.workers = workers
        self.app_dir = self.dir / "app"
        _copy_apps(self.app_dir)
        self.app_path = self.app_dir / "hello_wsgi.py"
        self.gen_file = self.dir / "generation"
        self.log_path = self.dir / f"{self.name}.log"
        self.log_path.touch()
        self.extra_env = dict(env or {})
        self.port: Optional[int] = None
        self.master: Optional[int] = None
        self.boot_s: Optional[float] = None
        self._popens: list = []
        self.set_generation("0")

    def set_generation(self, gen) -> None:
        proctree.write_atomically(self.gen_file, f"{gen}\n")

    def env(self) -> dict:
        paths = [str(ROOT), str(self.app_dir)] + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(paths),
                    HELLO_GEN_FILE=str(self.gen_file), **self.extra_env)

    def _popen(self, argv: list) -> subprocess.Popen:
        self.reap()
        log = open(self.log_path, "ab")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=self.env(), cwd=self.dir, start_new_session=True)
        finally:
            log.close()
        self._popens.append(popen)
        return popen

    def _wait_log(self, popen, offset: int, pattern: str, count: int, timeout: float, what: str):
        """Wait for `count` matches of `pattern` in the log past `offset`; the matches."""
        regex = re.compile(pattern)

        def seen():
            if popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {popen.returncode}:\n"
                                   + self.log_tail())
            found = regex.findall(self.log_text(offset))
            return found if len(found) >= count else None

        return proctree.wait_for(seen, timeout, f"{self.name}: {what}")

    def answers(self, path: str = "/") -> Optional[str]:
        return proctree.http_body(self.port, path)

    def break_app(self) -> None:
        """Append a syntax error to hello_wsgi.py (which chaos_wsgi imports)."""
        with open(self.app_path, "a", encoding="utf-8") as f:
            f.write("\ndef broken(:\n")

    def restore_app(self) -> None:
        shutil.copyfile(APPS / "hello_wsgi.py", self.app_path)

    def log_text(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def reap(self) -> None:
        for popen in self._popens:
            popen.poll()
        proctree.reap_orphans(keep=[p.pid for p in self._popens])

    def close(self, grace: float = 5.0) -> list:
        """SIGTERM to every process group we started, SIGKILL after `grace` s; the
        pids that needed SIGKILL."""
        stubborn = []
        for popen in self._popens:
            stubborn += proctree.kill_group(popen.pid, grace=grace, popens=[popen])
        proctree.reap_orphans()
        return stubborn

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FugueServer(_Proc):
    """fugue through fuguectl start --app, in the foreground, in its own group."""

    name = "fugue"
    READY_RE = r"worker \d+ \(pid (\d+), generation \d+\) ready"

    def __init__(self, workdir: str, app: str = "hello_wsgi:app", workers: int = 2,
                 options: tuple = (), env: Optional[dict] = None, command: Optional[list] = None):
        super().__init__(workdir, workers, env)
        self.app = app
        self.command = list(command) if command else None  # a foreign program instead of --app
        self.options = list(options)
        self.pidfile = self.dir / "fugue.pid"
        self.tmp_path = self.dir / "tmp"
        self.tmp_path.mkdir(mode=0o700, exist_ok=True)
        self.reported_s: Optional[float] = None  # fugue's own "(N.NNs)" for the first generation

    def start(self, port: Optional[int] = None, timeout: float = BOOT_TIMEOUT_S) -> int:
        offset = self.log_size()
        argv = [sys.executable, "-m", "fugue.ctl", "start",
                "--bind", f"127.0.0.1:{port or 0}", "--workers", str(self.workers),
                "--pid-file", str(self.pidfile), "--tmp-path", str(self.tmp_path),
                "--chdir", str(self.app_dir), *self.options]
        argv += ["--", *self.command] if self.command else ["--app", self.app]
        t0 = time.monotonic()
        popen = self._popen(argv)
        found = self._wait_log(popen, offset,
                               rf"\[{popen.pid}\] \[master\] INFO started: generation \d+ "
                               rf"serving \(([0-9.]+)s\)", 1, timeout, "'started' line")
        self.boot_s = time.monotonic() - t0
        self.reported_s = float(found[0])
        self.master = popen.pid
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)",
                                  self.log_text(offset)).group(1))
        proctree.wait_for(self.answers, BOOT_TIMEOUT_S, "a first answer")
        return self.port

    def worker_pids(self, master: Optional[int] = None) -> set:
        return {pid for pid in proctree.children(master or self.master)
                if re.search(r"fugue worker|fugue\._boot", cmdline(pid))}

    def ready_pids(self) -> set:
        return {int(p) for p in re.findall(self.READY_RE, self.log_text())}

    def read_pid(self) -> Optional[int]:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run `fuguectl ARGS --pid-file ... --tmp-path ...` against this master."""
        return subprocess.run([sys.executable, "-m", "fugue.ctl", *args,
                               "--pid-file", str(self.pidfile), "--tmp-path", str(self.tmp_path)],
                              capture_output=True, text=True, env=self.env(), cwd=self.dir,
                              timeout=timeout)

    def status(self) -> Optional[dict]:
        """fuguectl status --json, or None if the master did not answer."""
        try:
            done = self.ctl("status", "--json", "--wait", "5")
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None


class GunicornServer(gunicorn_side.Gunicorn):
    """gunicorn_side.Gunicorn, generalised: any app, worker class and extra flags.

    Adds a config file whose post_worker_init hook logs one line per worker
    that has imported the app: gunicorn's nearest equivalent of fugue's READY.
    """

    name = "gunicorn"
    READY_RE = r"bench: worker (\d+) initialized"

    def __init__(self, workdir: str, app: str = "hello_wsgi:app", workers: int = 2,
                 worker_class: str = "gthread", threads: int = 4,
                 options: tuple = (), env: Optional[dict] = None):
        super().__init__(workdir, workers=workers, threads=threads)
        _copy_apps(self.app_dir)
        self.app, self.worker_class = app, worker_class
        self.options = list(options)
        self.extra_env = dict(env or {})
        self.conf = self.dir / "bench_hooks.py"
        self.conf.write_text(
            "def post_worker_init(worker):\n"
            "    worker.log.info('bench: worker %s initialized', worker.pid)\n")
        self.log_path.touch()
        self.boot_s: Optional[float] = None

    def start(self, port: Optional[int] = None, timeout: float = BOOT_TIMEOUT_S) -> int:
        self.reap()
        self.port = port or gunicorn_side._probe_free_port()
        offset = self.log_path.stat().st_size
        argv = [sys.executable, "-m", "gunicorn", self.app, "-c", str(self.conf),
                "--chdir", str(self.app_dir), "--bind", f"127.0.0.1:{self.port}",
                "--worker-class", self.worker_class, "--workers", str(self.workers),
                "--keep-alive", str(self.keepalive), "--pid", str(self.pidfile),
                "--log-level", "info", *self.options]
        if self.worker_class == "gthread":
            argv += ["--threads", str(self.threads)]
        env = dict(os.environ, HELLO_GEN_FILE=str(self.gen_file), **self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join([str(self.app_dir)] + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=env, cwd=self.dir, start_new_session=True)
        log.close()
        self._popens.append(popen)
        regex = re.compile(self.READY_RE)

        def booted():
            if popen.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {popen.returncode}:\n"
                                   + self.log_tail())
            return len(regex.findall(self.log_text(offset))) >= self.workers

        proctree.wait_for(booted, timeout, f"{self.workers} gunicorn workers initialized")
        self.boot_s = time.monotonic() - t0
        self.master = popen.pid
        proctree.wait_for(self.answers, BOOT_TIMEOUT_S, "a first answer")
        return self.port

    def ready_pids(self) -> set:
        return {int(p) for p in re.findall(self.READY_RE, self.log_text())}

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def close(self, grace: float = 5.0) -> list:
        stubborn = []
        for popen in self._popens:
            stubborn += proctree.kill_group(popen.pid, grace=grace, popens=[popen])
        proctree.reap_orphans()
        return stubborn

    def answers(self, path: str = "/") -> Optional[str]:
        return proctree.http_body(self.port, path)


class BareServer(_Proc):
    """bare_serve.py: waitress or uvicorn on one pre-bound socket, N forked copies."""

    name = "bare"

    def __init__(self, workdir: str, kind: str, app: str, workers: int = 2):
        super().__init__(workdir, workers)
        self.kind, self.app = kind, app

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> int:
        offset = self.log_size()
        t0 = time.monotonic()
        popen = self._popen([sys.executable, str(HERE / "bare_serve.py"), "--kind", self.kind,
                             "--app", self.app, "--workers", str(self.workers)])
        self._wait_log(popen, offset, r"bare: worker (\d+) serving", self.workers, timeout,
                       "workers serving")
        self.boot_s = time.monotonic() - t0
        self.master = popen.pid
        self.port = int(re.search(r"bare: listening on 127\.0\.0\.1:(\d+)",
                                  self.log_text(offset)).group(1))
        proctree.wait_for(self.answers, BOOT_TIMEOUT_S, "a first answer")
        return self.port


class UvicornMulti(_Proc):
    """uvicorn --workers N: uvicorn's own multiprocess supervisor."""

    name = "uvicorn"

    def __init__(self, workdir: str, app: str = "hello_asgi:app", workers: int = 2):
        super().__init__(workdir, workers)
        self.app = app

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> int:
        offset = self.log_size()
        self.port = gunicorn_side._probe_free_port()
        t0 = time.monotonic()
        popen = self._popen([sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1",
                             "--port", str(self.port), "--workers", str(self.workers),
                             "--app-dir", str(self.app_dir), "--no-access-log",
                             "--no-server-header", "--log-level", "info"])
        self._wait_log(popen, offset, r"Application startup complete", self.workers, timeout,
                       "workers' startup")
        self.boot_s = time.monotonic() - t0
        self.master = popen.pid
        proctree.wait_for(self.answers, BOOT_TIMEOUT_S, "a first answer")
        return self.port


def uvicorn_worker_class() -> Optional[str]:
    """The gunicorn worker class that runs uvicorn, or None if there is none.

    The uvicorn-worker package is where it lives now; uvicorn itself still
    ships the deprecated uvicorn.workers.UvicornWorker (0.54 does).
    """
    import importlib.util
    import warnings

    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import uvicorn.workers  # noqa: F401
    except ImportError:
        return None
    return "uvicorn.workers.UvicornWorker"


def missing(*modules: str) -> list:
    """The modules of `modules` that cannot be imported (for "pip install ..." hints)."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]
