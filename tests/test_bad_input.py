"""Bad input: one clear line, a non-zero exit, nothing left behind."""

import json
import os
import socket

import pytest

from conftest import SYSTEM_PYTHON


def fails(p, pattern, workdir=None):
    status = p.wait_exit()
    out = p.log()
    assert status != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("fugue: ")]
    assert lines and pattern in lines[-1], out
    assert p.pids() == []
    if workdir is not None:
        assert not (workdir / "fugue.pid").exists()
    return lines[-1]


def test_port_in_use(fugue_proc, workdir):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        fails(fugue_proc(["app.py", str(port)]), f"port {port} already in use", workdir)
    finally:
        s.close()


def test_privileged_port_without_the_right(fugue_proc, world_dir):
    argv = ["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "app.py", "127.0.0.1:80", "1",
            json.dumps({"tmp_path": "/tmp", "pid_file": "/tmp/fugue-test-never.pid"})]
    line = fails(fugue_proc(argv, cwd=world_dir), "permission denied binding 127.0.0.1:80")
    assert "below 1024" in line


@pytest.mark.parametrize("opts, message", [
    ({"uid": "no-such-user-x"}, "unknown user 'no-such-user-x'"),
    ({"gid": "no-such-group-x"}, "unknown group 'no-such-group-x'"),
    ({"working_path": "/nonexistent/dir"}, "working_path /nonexistent/dir does not exist"),
    ({"tmp_path": "/nonexistent/tmp"}, "tmp_path /nonexistent/tmp does not exist"),
    ({"log_file": "/nonexistent/x.log"}, "log file directory /nonexistent does not exist"),
    ({"bogus": 1}, "unknown option 'bogus'; valid: workers, bind"),
    ({"backlog": "many"}, "option backlog: 'many' is not an integer >= 1"),
    ({"graceful_timeout": -1}, "option graceful_timeout: -1 is not a number > 0"),
    ({"daemonize": "perhaps"}, "option daemonize: 'perhaps' is not true or false"),
])
def test_bad_options(fugue_proc, workdir, opts, message):
    fails(fugue_proc(["app.py", "0", "1", json.dumps(opts)]), message, workdir)


def test_unwritable_tmp_path(fugue_proc, world_dir):
    argv = ["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "app.py", "0", "1",
            json.dumps({"pid_file": "/tmp/fugue-test-never.pid"})]
    fails(fugue_proc(argv, cwd=world_dir), "tmp_path", None)


def test_unix_socket_path_too_long(fugue_proc, workdir):
    path = str(workdir / ("s" * 120))
    fails(fugue_proc(["app.py", path, "1"]), "unix socket path too long", workdir)


def test_stale_pid_file_is_taken_over(fugue_proc, workdir):
    (workdir / "fugue.pid").write_text("999999\n")
    p = fugue_proc(["app.py", "0", "1"]).started()
    assert "stale pid file" in p.log() and "taking over" in p.log()
    assert p.master_pid() == p.popen.pid


def test_live_master_is_refused(fugue_proc, workdir):
    first = fugue_proc(["app.py", "0", "1"]).started()
    pid = first.master_pid()
    second = fugue_proc(["app.py", "0", "1"])
    assert second.wait_exit() != 0
    assert f"fugue: already running as pid {pid}" in second.log()
    assert first.master_pid() == pid  # untouched
    assert first.body().startswith("hello")


def test_stale_unix_socket_replaced_live_one_refused(fugue_proc, workdir):
    path = str(workdir / "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    p = fugue_proc(["app.py", path, "1"]).started()
    from conftest import http_get
    assert http_get(0, unix=path)[0] == 200
    other = fugue_proc(["app.py", path, "1", json.dumps({"pid_file": "other.pid"})])
    assert other.wait_exit() != 0
    assert f"unix:{path} is in use" in other.log()
    assert os.path.exists(path)  # the live one's socket was not removed
    p.signal(15)
    p.wait_exit()
    assert not os.path.exists(path)  # removed on exit


@pytest.mark.parametrize("opts, message", [
    ({"watch": True, "watch_paths": ["nope"]}, "cannot watch {workdir}/nope: no such file or directory"),
    ({"status_bind": "bogus"}, "status_bind: bad bind address 'bogus'"),
    ({"access_log": "/nonexistent/a.log"}, "access_log /nonexistent/a.log: directory /nonexistent does not exist"),
])
def test_refused_before_anything_is_bound(fugue_proc, workdir, opts, message):
    # these were refused only after 'listening on ...' (the access log: by every worker)
    p = fugue_proc(["app.py", "0", "1", json.dumps(opts)])
    fails(p, message.format(workdir=workdir), workdir)
    assert "listening on" not in p.log()


def test_watch_refusals_come_before_anything_is_bound(fugue_proc, workdir):
    (workdir / "watchfiles.py").write_text("raise ImportError('not installed')\n")
    p = fugue_proc(["fuguectl", "start", "--watch", "-w", "1", "--bind", "127.0.0.1:0", "app.py"])
    fails(p, "watch mode needs watchfiles: pip install watchfiles", workdir)
    assert "listening on" not in p.log()
