"""fuguectl against real masters: start, every control command, exit codes, errors.

Masters are started with `fuguectl start` through the fugue_proc fixture (real
processes, tagged cleanup); commands are run as real `python -m fugue.ctl`
processes, or through `fugue.ctl.main` in this process when only the command's
own logic is under test (what it prints, which exit status).
"""

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import APPS, PY, ROOT, http_get, wait_for

from fugue import ctl, ctlargs


def run_ctl(args, cwd, timeout=60, env=None):
    """(exit status, stdout, stderr) of `fuguectl ARGS` run in `cwd`."""
    full = dict(os.environ, PYTHONPATH=ROOT)
    full.pop("NOTIFY_SOCKET", None)
    full.pop("INVOCATION_ID", None)
    full.update(env or {})
    done = subprocess.run([PY, "-m", "fugue.ctl"] + list(args), cwd=str(cwd), env=full, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def status_json(cwd, *extra):
    rc, out, err = run_ctl(["status", "--json", *extra], cwd)
    assert rc == 0, err
    return json.loads(out)


def start(fugue_proc, *args):
    return fugue_proc(["fuguectl", "start", *args]).started()


# -- the whole life of a master through fuguectl ---------------------------------------------

def test_every_command_against_a_real_master(fugue_proc, workdir):
    p = start(fugue_proc, "-w", "2", "--bind", "127.0.0.1:0", "app.py")
    master = p.popen.pid  # foreground: fuguectl itself became the master
    assert p.master_pid() == master
    assert p.body().startswith("hello from worker")

    rc, out, err = run_ctl(["pid"], workdir)
    assert (rc, out.strip()) == (0, str(master)), err

    rc, out, err = run_ctl(["status"], workdir)
    assert rc == 0, err
    assert f"pid {master}" in out and "generation 1 serving" in out
    assert re.search(r"^\s+1\s+\d+\s+1\s+ready\s", out, re.M), out
    assert "REQUESTS" in out and "HEARTBEAT" in out and "RESTARTS" in out

    rc, out, err = run_ctl(["scale", "+1"], workdir)
    assert (rc, out.strip()) == (0, "workers: 3"), err
    wait_for(lambda: status_json(workdir)["ready_workers"] == 3, what="3 ready workers")
    rc, out, err = run_ctl(["scale", "--", "-2"], workdir)
    assert (rc, out.strip()) == (0, "workers: 1"), err
    rc, out, err = run_ctl(["scale", "2"], workdir)
    assert (rc, out.strip()) == (0, "workers: 2"), err
    rc, _, err = run_ctl(["scale", "many"], workdir)
    assert rc == 2 and one_line(err) == "fugue: scale: 'many' is not N, +N or -N"

    rc, out, err = run_ctl(["reopen-logs"], workdir)
    assert (rc, out.strip()) == (0, "reopened log files"), err

    rc, out, err = run_ctl(["reload"], workdir)
    assert rc == 0, err
    assert re.fullmatch(r"reload done: generation 2 serving \(\d+\.\d+s\)", out.strip())
    assert "generation 2" in p.body()

    rc, _, err = run_ctl(["watch", "on"], workdir)
    assert rc == 1 and one_line(err) == "fugue: watch mode is not enabled (start with --watch)"

    # an app name is for a router: a plain master reloaded everything and said done
    for cmd in ("reload", "upgrade"):
        rc, out, err = run_ctl([cmd, "api"], workdir)
        assert (rc, out, one_line(err)) == (1, "", f"fugue: {cmd} api: this master serves one app; "
                                                   "an app name is for a router (routed mode)")
    assert "generation 2" in p.body() and p.master_pid() == master

    rc, out, err = run_ctl(["stop"], workdir)
    assert (rc, out.strip()) == (0, f"master pid {master} stopped"), err
    assert p.popen.poll() is not None or p.wait_exit() == 0
    assert not os.path.exists(workdir / "fugue.pid")

    rc, _, err = run_ctl(["status"], workdir)
    assert rc == 3 and one_line(err) == "fugue: no fugue master: pid file fugue.pid not found"


def test_reload_exit_status_on_rollback(fugue_proc, workdir):
    p = start(fugue_proc, "-w", "1", "--bind", "127.0.0.1:0", "app.py")
    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    rc, out, err = run_ctl(["reload"], workdir)
    assert rc == 1, out
    line = one_line(err)
    assert line.startswith("fugue: reload failed: worker 1 ") and "RuntimeError: broken at import on purpose" in line
    assert line.endswith("generation 1 keeps serving")
    assert "generation 1" in p.body()
    status = status_json(workdir)
    assert status["master"]["last_event"]["ok"] is False
    assert status["master"]["last_event"]["what"] == "reload"
    rc, _, err = run_ctl(["stop", "--quick"], workdir)
    assert rc == 0, err


def test_upgrade_exit_status_for_takeover_and_rollback(fugue_proc, workdir):
    p = start(fugue_proc, "-w", "1", "--bind", "127.0.0.1:0", "--status-bind", "127.0.0.1:0", "app.py")
    old = p.master_pid()
    rc, out, err = run_ctl(["upgrade"], workdir)
    assert rc == 0, err
    m = re.fullmatch(r"upgrade done: new master pid (\d+) serving \(\d+\.\d+s\)", out.strip())
    assert m, out
    new = int(m.group(1))
    # The new master is fuguectl re-run from its own command line: it serves the same port.
    wait_for(lambda: p.master_pid() == new, what="the new master's pid file")
    assert "generation 2" in p.body()
    p.wait_log(rf"\[{old}\] \[master\] INFO master exiting")

    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    rc, out, err = run_ctl(["upgrade"], workdir)
    assert rc == 1, out
    line = one_line(err)
    assert line.startswith("fugue: upgrade failed: new master pid ")
    assert "RuntimeError: broken at import on purpose" in line and line.endswith(f"pid {new} keeps serving")
    assert p.master_pid() == new
    assert "generation 2" in p.body()
    rc, _, err = run_ctl(["stop"], workdir)
    assert rc == 0, err


def test_upgrade_shows_why_a_new_master_could_not_start(fugue_proc, workdir):
    (workdir / "fugue.toml").write_text('workers = 1\nbind = "127.0.0.1:0"\nscript = "app.py"\n')
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    (workdir / "fugue.toml").write_text('workers = "lots"\n')  # the new master re-reads it
    rc, _, err = run_ctl(["upgrade", "-c", "fugue.toml"], workdir)
    assert rc == 1
    line = one_line(err)
    assert "fugue.toml: workers = \"lots\": expected an integer >= 0" in line, line
    assert p.body().startswith("hello")


def test_watch_pause_and_resume(fugue_proc, workdir):
    start(fugue_proc, "-w", "1", "--bind", "127.0.0.1:0", "--watch", "app.py")
    assert status_json(workdir)["master"]["watch"] is True
    rc, out, err = run_ctl(["watch", "off"], workdir)
    assert (rc, out.strip()) == (0, "watch off"), err
    assert status_json(workdir)["master"]["watch"] is False
    rc, out, err = run_ctl(["watch", "on"], workdir)
    assert (rc, out.strip()) == (0, "watch on"), err
    rc, _, err = run_ctl(["stop"], workdir)
    assert rc == 0, err


# -- start: targets, precedence, daemon --------------------------------------------------------

def test_config_file_wins_over_the_script_and_flags_over_the_file(fugue_proc, workdir):
    conf = workdir / "conf"
    conf.mkdir()
    (conf / "fugue.toml").write_text(
        'workers = 3\nname = "fromfile"\nbind = ["127.0.0.1:0"]\npid_file = "app.pid"\n'
        'graceful_timeout = 5\n')
    # app.py asks for 2 workers itself: the file says 3.
    p = fugue_proc(["fuguectl", "start", "-c", "conf/fugue.toml", "app.py", "0", "2"]).started()
    assert (conf / "app.pid").exists(), "relative paths in a config file are relative to it"
    data = status_json(workdir, "-c", "conf/fugue.toml")
    assert data["master"]["workers_wanted"] == 3
    assert data["master"]["name"] == "fromfile"
    rc, _, err = run_ctl(["stop", "-c", "conf/fugue.toml"], workdir)
    assert rc == 0, err
    p.wait_exit()

    p = fugue_proc(["fuguectl", "start", "-c", "conf/fugue.toml", "-w", "1", "--name", "fromflag",
                    "--pid-file", "flag.pid", "app.py"]).started()
    assert p.master_pid("flag.pid") == p.popen.pid
    # tmp_path is the file's (conf/tmp), the pid file the flag's
    data = status_json(workdir, "-c", "conf/fugue.toml", "--pid-file", "flag.pid")
    assert data["master"]["workers_wanted"] == 1
    assert data["master"]["name"] == "fromflag"
    rc, _, err = run_ctl(["stop", "-c", "conf/fugue.toml", "--pid-file", "flag.pid"], workdir)
    assert rc == 0, err


def test_c_file_puts_the_default_pid_file_and_tmp_path_beside_it(fugue_proc, workdir, tmp_path):
    """-c FILE: the default pid file and tmp_path are in FILE's directory, so every control
    command finds the master from anywhere with -c alone (and a unit names them once, in the file)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hello.toml").write_text(f'script = "{workdir}/app.py"\nbind = ["127.0.0.1:0"]\nworkers = 1\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = fugue_proc(["fuguectl", "start", "--foreground", "-c", str(etc / "hello.toml")], cwd=elsewhere).started()
    assert int((etc / "fugue.pid").read_text()) == p.popen.pid
    assert (etc / "tmp").is_dir() and not (elsewhere / "fugue.pid").exists() and not (elsewhere / "tmp").exists()
    data = status_json(tmp_path, "-c", str(etc / "hello.toml"))  # a third directory
    assert data["master"]["pid"] == p.popen.pid
    rc, out, err = run_ctl(["stop", "-c", "etc/hello.toml"], tmp_path)  # relative to the cwd, as given
    assert rc == 0, err
    assert p.wait_exit() == 0


def test_app_target_and_daemon_from_a_config_file(fugue_proc, workdir):
    (workdir / "fugue.toml").write_text(
        'app = "app:Handler"\nworkers = 2\nbind = ["127.0.0.1:0", "unix:app.sock"]\n'
        'daemonize = true\nlog_file = "fugue.log"\n')
    launcher = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"])
    assert launcher.wait_exit() == 0, launcher.log()
    pid = int(re.fullmatch(r"fugue: master running as pid (\d+)", one_line(launcher.log())).group(1))
    assert int((workdir / "fugue.pid").read_text()) == pid
    data = status_json(workdir)
    tcp = [lst["address"] for lst in data["listeners"] if lst["family"] == "inet"][0]
    status, body, _ = http_get(int(tcp.rsplit(":", 1)[1]))
    assert status == 200 and body.startswith("hello from worker")
    status, body, _ = http_get(None, unix=str(workdir / "app.sock"))  # every listener, every worker
    assert status == 200 and body.startswith("hello from worker")
    rc, out, err = run_ctl(["stop"], workdir)
    assert (rc, out.strip()) == (0, f"master pid {pid} stopped"), err
    assert not (workdir / "app.sock").exists()


def test_start_errors_are_one_line(fugue_proc, workdir):
    (workdir / "noop.py").write_text("print('hi')\n")
    cases = [
        (["start", "--bind", "127.0.0.1:0", "noop.py"], 1, "fugue: noop.py returned without calling fugue.start()"),
        (["start", "missing.py"], 1, "fugue: script missing.py not found"),
        (["start", "--app", "nosuchmodule:app", "--bind", "127.0.0.1:0"], 1,
         "fugue: --app nosuchmodule:app: ModuleNotFoundError: No module named 'nosuchmodule'"),
        (["start", "--app", "app:VERSION", "--bind", "127.0.0.1:0"], 1, None),
        (["start", "--bind", "127.0.0.1:0", "--", "no-such-program-here"], 1,
         "fugue: command no-such-program-here: not found in PATH"),
        (["start", "-w", "2"], 2, "fugue: nothing to start: give a script, --app MODULE:ATTR or -- COMMAND "
                                  "(or app, script or command in the config file)"),
        (["start", "--workers", "two", "app.py"], 2, "fugue: --workers two: expected an integer >= 0"),
    ]
    for args, status, text in cases:
        rc, out, err = run_ctl(args, workdir)
        line = one_line(err)
        assert rc == status, (args, err)
        if text:
            assert line == text, args
        else:
            assert line.startswith("fugue: --app app:VERSION: fugue cannot serve a str"), line
    p = start(fugue_proc, "-w", "1", "--bind", "127.0.0.1:0", "app.py")
    rc, _, err = run_ctl(["start", "--bind", "127.0.0.1:0", "app.py"], workdir)
    assert rc == 1
    assert one_line(err) == f"fugue: already running as pid {p.popen.pid} (pid file {workdir}/fugue.pid)"


# -- finding the master: every way it can fail ----------------------------------------------------

def _main(capsys, *args):
    rc = ctl.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("PWD", raising=False)
    return workdir


def test_control_commands_take_the_pid_file_as_start_does(in_workdir, capsys):
    # `fuguectl start -D -p app.pid app:app`, then `fuguectl stop -p app.pid` (gunicorn's -p)
    for flag in ("-p", "--pid", "--pid-file"):
        rc, _, err = _main(capsys, "stop", flag, "run/app.pid")
        assert (rc, one_line(err)) == (3, "fugue: no fugue master: pid file run/app.pid not found")


@pytest.mark.parametrize("args, line", [
    (["start", "--log-levle", "info", "--app", "a:b"],
     "fugue: unrecognized arguments: --log-levle; did you mean --log-level? (see fuguectl start --help)"),
    (["start", "a:b", "--drain-dealy", "5"],
     "fugue: unrecognized arguments: --drain-dealy; did you mean --drain-delay? (see fuguectl start --help)"),
    (["status", "--jsn"],
     "fugue: unrecognized arguments: --jsn; did you mean --json? (see fuguectl status --help)"),
    (["drain", "--now"], "fugue: unrecognized arguments: --now (see fuguectl drain --help)"),
    (["start", "--no-status-targets=1", "--app", "a:b"],
     "fugue: argument --status-targets/--no-status-targets: ignored explicit argument '1' "
     "(see fuguectl start --help)"),
    (["check", "--warmup"], "fugue: argument --warmup: expected one argument (see fuguectl check --help)"),
    (["scale"], "fugue: the following arguments are required: N|+N|-N (see fuguectl scale --help)"),
    # a value holding a newline is shown quoted, as flag values are: the refusal stays one line
    (["drain", "--x\ny"], "fugue: unrecognized arguments: '--x\\ny' (see fuguectl drain --help)"),
    (["check", "--app", "a:b", "--pid-file", "p", "--x\ny=1"],
     "fugue: unrecognized arguments: '--x\\ny=1' (see fuguectl check --help)"),
    (["watch", "o\nn"], "fugue: argument state: invalid choice: 'o\\nn' (choose from 'on', 'off') "
     "(see fuguectl watch --help)"),
])
def test_argparse_refusals_are_one_line(in_workdir, capsys, args, line):
    # argparse's own refusals printed the whole usage first (25 lines for start)
    rc, out, err = _main(capsys, *args)
    assert (rc, out, one_line(err)) == (2, "", line)


def test_a_value_holding_a_newline_stays_on_one_line(in_workdir, capsys):
    # hypothesis found `--working-path=$'\n'` printing a two-line error (FugueError's rule)
    rc, out, err = _main(capsys, "check", "--bind", "127.0.0.1:0", "--app", "a:b", "--working-path", "x\ny")
    assert (rc, out, one_line(err)) == (
        1, "", f"fugue: working_path {in_workdir}/x\\ny does not exist or is not a directory")


def _fake_master(workdir, listen=True, answer=False):
    """A process titled 'fugue master' with a control socket that never answers (or refuses)."""
    code = f"""
import os, socket, sys, setproctitle
setproctitle.setproctitle("fugue master fake")
d = os.path.join({str(workdir)!r}, "tmp", f"fugue-{{os.getpid()}}")
os.makedirs(d, mode=0o700)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(os.path.join(d, "control.sock"))
if {listen!r}:
    s.listen(1)
open({str(workdir / 'fugue.pid')!r}, "w").write(str(os.getpid()))
print("ready", flush=True)
sys.stdin.read()
"""
    proc = subprocess.Popen([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_no_master_stale_and_unreachable(in_workdir, capsys):
    rc, _, err = _main(capsys, "status")
    assert (rc, one_line(err)) == (3, "fugue: no fugue master: pid file fugue.pid not found")
    rc, _, err = _main(capsys, "reload", "--pid-file", "run/other.pid")
    assert (rc, one_line(err)) == (3, "fugue: no fugue master: pid file run/other.pid not found")

    done = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (in_workdir / "fugue.pid").write_text(done.stdout)
    rc, _, err = _main(capsys, "stop")
    assert (rc, one_line(err)) == (3, f"fugue: no fugue master: stale pid file fugue.pid "
                                      f"(pid {done.stdout.strip()} is not running)")
    (in_workdir / "fugue.pid").write_text(f"{os.getpid()}\n")
    rc, _, err = _main(capsys, "stop")
    assert (rc, one_line(err)) == (3, f"fugue: no fugue master: stale pid file fugue.pid "
                                      f"(pid {os.getpid()} is not a fugue master)")
    (in_workdir / "fugue.pid").write_text("garbage\n")
    rc, _, err = _main(capsys, "pid")
    assert rc == 1 and "does not contain a pid" in one_line(err)

    fake = _fake_master(in_workdir)
    try:
        rc, _, err = _main(capsys, "status", "--wait", "0.3")
        assert (rc, one_line(err)) == (1, f"fugue: timed out after 0.3s waiting for the master "
                                          f"(pid {fake.pid}) to answer status")
        rc, out, _ = _main(capsys, "pid")
        assert (rc, out.strip()) == (0, str(fake.pid))
        rc, _, err = _main(capsys, "status", "--tmp-path", "elsewhere")
        assert rc == 1 and one_line(err).startswith(f"fugue: cannot reach the master (pid {fake.pid}): "
                                                    "no control socket at ")
    finally:
        fake.kill()
        fake.wait()
    fake = _fake_master(in_workdir, listen=False)
    try:
        rc, _, err = _main(capsys, "reload")
        assert rc == 1 and one_line(err).startswith(f"fugue: the master (pid {fake.pid}) is not accepting commands")
    finally:
        fake.kill()
        fake.wait()


# -- the control socket refuses other users ----------------------------------------------------------

def _as_nobody(fn):
    """Run fn() in a forked child as nobody; (its return value, its stderr)."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    er, ew = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(er)
            os.dup2(ew, 2)
            sys.stderr = os.fdopen(2, "w")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = fn()
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(ew)
    out = err = b""
    with os.fdopen(r, "rb") as f:
        out = f.read()
    with os.fdopen(er, "rb") as f:
        err = f.read()
    os.waitpid(pid, 0)
    return json.loads(out or b"null"), err.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_control_socket_refuses_another_uid(fugue_proc):
    home = tempfile.mkdtemp(prefix="fugue-ctl-uid-")
    try:
        os.chmod(home, 0o755)
        shutil.copy(os.path.join(APPS, "app.py"), home)
        p = fugue_proc(["fuguectl", "start", "-w", "1", "--bind", "127.0.0.1:0", "app.py"], cwd=home).started()
        pid = p.master_pid()
        args = ["status", "--pid-file", os.path.join(home, "fugue.pid"), "--tmp-path", os.path.join(home, "tmp")]

        # The run directory is 0700: another user cannot even reach the socket.
        rc, err = _as_nobody(lambda: ctl.main(args))
        assert rc == 1
        assert one_line(err) == (f"fugue: permission denied: the control socket of master pid {pid} "
                                 "belongs to another user (run fuguectl as the master's user or root)")

        # Open the directory and the socket up: SO_PEERCRED still says no.
        run_dir = os.path.join(home, "tmp", f"fugue-{pid}")
        os.chmod(os.path.join(home, "tmp"), 0o711)
        os.chmod(run_dir, 0o711)
        os.chmod(os.path.join(run_dir, "control.sock"), 0o666)
        rc, err = _as_nobody(lambda: ctl.main(args))
        nobody = pwd.getpwnam("nobody").pw_uid
        assert rc == 1
        assert one_line(err) == f"fugue: permission denied: uid {nobody} is not the master's uid (0) or root"
        p.wait_log(rf"control: refused a connection from uid {nobody}")
        rc, out, _ = run_ctl(args[1:] and ["status", "--json"] + args[1:], home)
        assert rc == 0 and json.loads(out)["master"]["pid"] == pid  # root (the master's uid) still gets in
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- systemd: sd_notify and socket activation, spoken for real ----------------------------------------

def test_notify_socket_gets_ready_and_mainpid(fugue_proc, workdir):
    path = str(workdir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        p = fugue_proc(["fuguectl", "start", "--foreground", "-w", "1", "--bind", "127.0.0.1:0", "app.py"],
                       env={"NOTIFY_SOCKET": path})

        def until(word):
            seen = []
            while True:
                msg = sock.recv(4096).decode()
                seen.append(msg)
                if word in msg.split("\n"):
                    return msg, seen

        msg, _ = until("READY=1")
        assert f"MAINPID={p.popen.pid}" in msg.split("\n")
        rc, _, err = run_ctl(["reload"], workdir)
        assert rc == 0, err
        msg, seen = until("READY=1")
        assert any("RELOADING=1" in m.split("\n") for m in seen)
        assert "STATUS=generation 2 serving" in msg
        rc, out, err = run_ctl(["upgrade"], workdir)
        assert rc == 0, err
        new = int(re.search(r"new master pid (\d+)", out).group(1))
        # MainPID stays the process systemd started (the keeper); the master behind it is new.
        wait_for(lambda: "STATUS=generation 3 serving (upgraded)" in until("READY=1")[0].split("\n"),
                 what="READY of the new master, relayed")
        assert int((workdir / "fugue.pid").read_text()) == new != p.popen.pid
        run_ctl(["stop"], workdir)
        msg, _ = until("STOPPING=1")
        assert p.wait_exit() == 0
    finally:
        sock.close()


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="needs systemd-socket-activate")
def test_socket_activation_with_systemd_socket_activate(fugue_proc, workdir):
    path = str(workdir / "activated.sock")
    p = fugue_proc(["systemd-socket-activate", "-l", path, "--fdname=web", "-E", "PYTHONPATH",
                    "-E", "FUGUE_TEST_TAG", "-E", "PYTHONUNBUFFERED",
                    PY, "-m", "fugue.ctl", "start", "--foreground", "-w", "2", "app.py"])
    wait_for(lambda: os.path.exists(path), what="the activation socket")
    # The first connection makes systemd-socket-activate exec fuguectl with LISTEN_FDS=1.
    status, body, _ = http_get(None, unix=path, timeout=20)
    assert status == 200 and body.startswith("hello from worker")
    p.started()
    data = status_json(workdir)
    assert data["master"]["pid"] == p.popen.pid  # it exec'd: LISTEN_PID was its own pid
    assert [lst["name"] for lst in data["listeners"]] == ["web"]
    assert data["listeners"][0]["address"] == "unix:" + path
    rc, _, err = run_ctl(["stop"], workdir)
    assert rc == 0, err
    assert os.path.exists(path), "the socket belongs to the activator: the master must not unlink it"


def _unit(name):
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(os.path.join(ROOT, "contrib", "systemd", name))
    return parser


def test_systemd_units_say_what_fuguectl_does(tmp_path):
    import shlex

    service = _unit("fugue@.service")["Service"]
    # The keeper is the main process for the service's life: no PIDFile=, only it notifies.
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main" and "PIDFile" not in service
    assert service["KillMode"] == "mixed" and service["User"] and service["Group"]
    start = shlex.split(service["ExecStart"])
    reload = shlex.split(service["ExecReload"])
    assert start[:4] == ["/usr/local/bin/fuguectl", "start", "--foreground", "-c"]
    assert reload[:2] == ["/usr/local/bin/fuguectl", "upgrade"]
    parser = ctlargs.build_parser()
    for argv in (start, reload):  # every flag in the unit is one fuguectl knows
        args = parser.parse_args([a.replace("%i", "hello") for a in argv[1:]])
        assert args.config == "/etc/fugue/hello.toml"  # the paths are in the file, once
        assert args.pid_file is None and args.tmp_path is None
    assert _unit("fugue@.socket")["Socket"]["ListenStream"]
    if shutil.which("systemd-analyze"):
        for name in ("fugue@.service", "fugue@.socket"):
            with open(os.path.join(ROOT, "contrib", "systemd", name)) as f:
                text = f.read().replace("/usr/local/bin/fuguectl", f"{PY} -m fugue.ctl")
            (tmp_path / name).write_text(text)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", "./fugue@hello.service",
                               "./fugue@hello.socket"], cwd=tmp_path, capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (0, "")
