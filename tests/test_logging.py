"""Logs a gunicorn user expects: the access log of every HTTP adapter (gunicorn's format and atoms,
reopened on USR1), --log-level, log_format = "json", waitress's and uvicorn's loggers following
them, and journal priority prefixes when stderr is the journal (sd-daemon(3))."""

import http.client
import json
import logging
import os
import re
import signal
import socket

import pytest

from conftest import http_get, wait_for
from fugue import daemon
from fugue.accesslog import AccessLog

APPS = ["app.py", "wsgi_app.py", "asgi_app.py"]  # http.server, WSGI (waitress), ASGI (uvicorn)
DEFAULT_LINE = (r'^127\.0\.0\.1 - alice \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                r'"GET /\?x=1 HTTP/1\.1" 200 \d+ "http://example\.test/from" "test-agent/1\.0"$')
HEADERS = {"User-Agent": "test-agent/1.0", "Referer": "http://example.test/from",
           "Authorization": "Basic YWxpY2U6c2VjcmV0", "X-Trace": 'abc"123'}


def lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("app", APPS)
def test_access_log_in_gunicorns_format_reopened_on_usr1(fugue_proc, workdir, app):
    p = fugue_proc(["fuguectl", "start", "--access-logfile", "access.log", app, "0", "2"]).started()
    path = workdir / "access.log"
    for _ in range(3):
        assert p.get("/?x=1", headers=HEADERS)[0] == 200
    wait_for(lambda: len(lines(path)) >= 3, what="3 access log lines")
    for line in lines(path):
        assert re.match(DEFAULT_LINE, line), line
    os.rename(path, workdir / "access.log.1")
    p.signal(signal.SIGUSR1)
    p.wait_log(r"reopened log files")

    def reopened():  # a worker reopens when it reads the master's REOPEN: ask until one did
        p.get("/?x=1", headers=HEADERS)
        return lines(path)
    wait_for(reopened, what="a line in the new access.log")
    assert all(re.match(DEFAULT_LINE, line) for line in lines(path))
    assert len(lines(workdir / "access.log.1")) >= 3
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


@pytest.mark.parametrize("app", APPS)
def test_access_log_format_atoms_and_json_lines(fugue_proc, workdir, app):
    fmt = '%(h)s %(m)s %(U)s %(q)s %(H)s %(s)s %(B)s %(D)s %(p)s %({x-trace}i)s %({content-type}o)s %(z)s'
    p = fugue_proc(["fuguectl", "start", "--access-logfile", "-", "--access-logformat", fmt, app, "0", "1"]).started()
    assert p.get("/?x=1", headers=HEADERS)[0] == 200
    m = p.wait_log(r'(?m)^127\.0\.0\.1 GET / x=1 HTTP/1\.1 200 (\d+) (\d+) <(\d+)> abc\\"123 (\S+) -$')
    assert int(m.group(1)) > 0 and m.group(4).startswith("text/plain")
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0

    q = fugue_proc(["fuguectl", "start", "--access-logfile", "-", "--log-format", "json", app, "0", "1"]).started()
    assert q.get("/?x=1", headers=HEADERS)[0] == 200
    line = q.wait_log(r'(?m)^\{"time": [^\n]*"type": "access"[^\n]*$').group(0)
    record = json.loads(line)
    assert {k: record[k] for k in ("remote", "user", "method", "path", "query", "protocol", "status", "referer",
                                   "user_agent", "role", "worker", "generation")} == {
        "remote": "127.0.0.1", "user": "alice", "method": "GET", "path": "/", "query": "x=1",
        "protocol": "HTTP/1.1", "status": 200, "referer": "http://example.test/from",
        "user_agent": "test-agent/1.0", "role": "worker", "worker": 1, "generation": 1}
    assert record["bytes"] > 0 and record["duration_ms"] >= 0
    q.signal(signal.SIGTERM)
    assert q.wait_exit() == 0


def test_no_access_log_by_default_and_a_bad_format_is_one_line(fugue_proc, workdir):
    p = fugue_proc(["fuguectl", "start", "wsgi_app.py", "0", "1"]).started()
    assert p.get("/?x=1", headers=HEADERS)[0] == 200
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    assert "GET /?x=1" not in p.log()
    bad = fugue_proc(["fuguectl", "start", "--access-logformat", "%(h)s %(s", "wsgi_app.py"])
    assert bad.wait_exit() == 2
    assert bad.log().strip() == "fugue: access_log_format '%(h)s %(s': incomplete format key (atoms look like %(h)s)"


def test_json_log_lines(fugue_proc, workdir):
    p = fugue_proc(["fuguectl", "start", "--log-format", "json", "asgi_app.py", "0", "1"]).started()
    p.body()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    records = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    roles = {(r["role"], r.get("worker"), r.get("generation")) for r in records}
    assert ("master", None, None) in roles and ("worker", 1, 1) in roles, roles
    started = next(r for r in records if r["message"].startswith("started: generation 1 serving"))
    assert started["level"] == "info" and started["pid"] == p.popen.pid
    assert all(set(r) >= {"time", "level", "pid", "role", "message"} for r in records)
    # uvicorn's own lines come through fugue's handler, as JSON too
    assert any(r.get("logger", "").startswith("uvicorn") for r in records), records


@pytest.mark.parametrize("level,shown,hidden", [
    ("warning", [], [r" INFO ", r"Waiting for application startup"]),
    ("info", [r"\[worker 1\] INFO Waiting for application startup"], [r" DEBUG "]),
    ("debug", [r"\[master\] DEBUG "], []),
])
def test_log_level_applies_to_fugue_and_uvicorn(fugue_proc, workdir, level, shown, hidden):
    sock = str(workdir / "app.sock")
    p = fugue_proc(["fuguectl", "start", "--log-level", level, "-b", f"unix:{sock}", "-w", "1",
                    "-k", "uvicorn.workers.UvicornWorker", "asgi_app:app"])
    wait_for(lambda: _answers(sock), what="the unix socket answering")
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    text = p.log()
    for pattern in shown:
        assert re.search(pattern, text), (pattern, text[-2000:])
    for pattern in hidden:
        assert not re.search(pattern, text), (pattern, text[-2000:])


def _answers(sock):
    try:
        return http_get(0, unix=sock, timeout=2)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def test_waitress_queue_depth_warning_is_a_debug_line(tmp_path):
    r, w = os.pipe()
    try:
        handler = daemon.LogHandler(w)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        daemon.adopt_library_loggers(handler, logging.INFO)
        logging.getLogger("waitress.queue").warning("Task queue depth is %d", 7)
        logging.getLogger("waitress").warning("a real warning")
        daemon.adopt_library_loggers(handler, logging.DEBUG)
        logging.getLogger("waitress.queue").warning("Task queue depth is %d", 8)
        os.close(w)
        w = None
        out = os.read(r, 65536).decode()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        for name in ("waitress", "uvicorn"):
            logging.getLogger(name).handlers[:] = []
    assert out.splitlines() == ["WARNING waitress a real warning", "DEBUG waitress.queue Task queue depth is 8"]


# -- issue 14 item 4: journal priorities ---------------------------------------------------------

def journal_of(path):
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_priority_prefixes_when_stderr_is_the_journal(fugue_proc, workdir):
    out = workdir / "out-0.log"  # the harness's stdout/stderr file of the first process: the "journal"
    out.touch()
    p = fugue_proc(["fuguectl", "start", "--access-logfile", "-", "wsgi_app.py", "0", "1"],
                   env={"JOURNAL_STREAM": journal_of(out)})
    assert p.log_path == str(out)
    p.started()
    assert p.get("/?x=1")[0] == 200
    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed")
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    text = p.log()
    assert re.search(r"(?m)^<6>\S+ \S+ \[\d+\] \[master\] INFO started: generation 1 serving", text), text
    assert re.search(r"(?m)^<3>\S+ \S+ \[\d+\] \[master\] ERROR reload failed: ", text), text
    assert re.search(r'(?m)^<6>127\.0\.0\.1 - - \[.*\] "GET /\?x=1 HTTP/1\.1" 200 ', text), text
    for line in text.splitlines():  # every line fugue wrote (a worker's traceback included) has one
        if re.match(r"(<\d>)?\d{4}-\d\d-\d\d ", line):
            assert re.match(r"<[2-7]>", line), line


def test_no_prefix_when_journal_stream_names_another_file(fugue_proc, workdir):
    other = workdir / "elsewhere"
    other.touch()
    p = fugue_proc(["fuguectl", "start", "wsgi_app.py", "0", "1"], env={"JOURNAL_STREAM": journal_of(other)})
    p.started()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    assert not re.search(r"(?m)^<\d>", p.log()), p.log()


def test_access_log_reopen_keeps_the_old_file_when_refused(tmp_path):
    target = tmp_path / "logs" / "access.log"
    target.parent.mkdir()
    access = AccessLog(str(target))
    access.open()
    os.rename(target.parent, tmp_path / "moved")
    access.reopen()  # the directory is gone: refused, said once, the old descriptor kept
    access.write(b"still written\n")
    access.close()
    assert (tmp_path / "moved" / "access.log").read_text() == "still written\n"


def test_routed_mode_access_log_has_the_real_client_address(fugue_proc, workdir):
    """The router hands the client's own TCP connection to the app's worker, so the access
    log shows the client's address: a client bound to 127.0.0.2 is logged as 127.0.0.2."""
    from test_router import start_router

    p = start_router(fugue_proc, workdir, top='access_log = "access.log"')
    port = p.port
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"GET /?who=me HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b"peer 127.0.0.2:" in reply, reply
    path = workdir / "access.log"
    line = wait_for(lambda: next((l for l in lines(path) if "who=me" in l), None), what="the access line")
    assert re.match(r'^127\.0\.0\.2 - - \[.*\] "GET /\?who=me HTTP/1\.1" 200 \d+ "-" "-"$', line), line


def test_access_log_of_workers_running_as_nobody(fugue_proc, world_dir):
    """-u nobody --access-logfile in a directory only root may write: the master creates the
    file and gives it to the workers' user (as gunicorn does), the workers write to it."""
    from conftest import SYSTEM_PYTHON

    logs = os.path.join(world_dir, "logs")
    os.mkdir(logs, 0o755)
    opts = {"uid": "nobody", "gid": "nogroup", "access_log": "logs/access.log"}
    p = fugue_proc([os.path.join(world_dir, "app.py"), "0", "1", json.dumps(opts)],
                   cwd=world_dir, python=SYSTEM_PYTHON).started()
    assert p.get("/?x=1")[0] == 200
    path = os.path.join(logs, "access.log")
    wait_for(lambda: "GET /?x=1" in open(path).read(), what="the access line")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
