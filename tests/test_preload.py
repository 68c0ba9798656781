"""Preload (issue 15): one mold per generation imports the app, the workers are forked from it.

The app (tests/apps/preload_app.py) answers with the pid and euid of the interpreter
that imported it: a worker forked from a mold shows the mold's pid there, an exec'd
one its own. Its parent must be the master either way.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, SYSTEM_PYTHON, record_lines, wait_for

PRELOAD = json.dumps({"preload": True})


def answer(p, path="/"):
    return json.loads(p.body(path))


def answers(p, n=12):
    return [answer(p) for _ in range(n)]


def mold_pid(p, generation):
    return int(p.wait_log(rf"started mold \(pid (\d+), generation {generation}\)").group(1))


def test_workers_are_forked_from_the_mold_and_stay_the_masters(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "3", PRELOAD]).started()
    master = p.master_pid()
    mold = mold_pid(p, 1)
    seen = {}
    for a in answers(p, 30):
        seen[a["pid"]] = a
    assert len(seen) >= 2
    for pid, a in seen.items():
        assert a["import_pid"] == mold != pid   # imported once, in the mold
        assert a["ppid"] == master              # the master's child: it reaps and signals it
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rpartition(")")[2].split()[2]) == pid  # its own process group
    assert len(record_lines(workdir / "imports.log")) == 1
    # after_fork: once in each worker, none in the mold, with the worker's id.
    hooked = record_lines(workdir / "after_fork.log")
    assert sorted(int(w) for _, w, _ in hooked) == [1, 2, 3]
    assert len({pid for pid, _, _ in hooked}) == 3 and str(mold) not in {pid for pid, _, _ in hooked}
    assert all(a["hooked"] == [a["worker"]] for a in seen.values())
    # The mold accepts nothing: it holds no listening socket.
    port = p.port
    for fd in os.listdir(f"/proc/{mold}/fd"):
        target = os.readlink(f"/proc/{mold}/fd/{fd}")
        if target.startswith("socket:"):
            inode = target[8:-1]
            with open("/proc/net/tcp") as f:
                listening = [ln for ln in f if f":{port:04X} " in ln and f" {inode} " in ln]
            assert not listening


def test_reload_imports_the_new_code_in_a_new_mold(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "2", PRELOAD]).started()
    old_mold = mold_pid(p, 1)
    assert {a["version"] for a in answers(p)} == {"v1"}
    (workdir / "preload_lib.py").write_text('VERSION = "v2"\n')
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"worker \d \(pid \d+, generation 1\) stopped", count=2)
    new_mold = mold_pid(p, 2)
    got = answers(p)
    assert {a["version"] for a in got} == {"v2"}
    assert {a["import_pid"] for a in got} == {new_mold}
    # The old mold retires with its generation.
    p.wait_log(rf"mold \(pid {old_mold}, generation 1\) retired")
    wait_for(lambda: not os.path.exists(f"/proc/{old_mold}") or _zombie(old_mold), what="old mold gone")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("kind", ["syntax", "after_fork"])
def test_broken_code_rolls_back_with_the_reason(fugue_proc, workdir, kind):
    p = fugue_proc(["preload_app.py", "0", "2", PRELOAD]).started()
    before = {int(m) for m in re.findall(r"worker \d \(pid (\d+), generation 1\) ready", p.log())}
    assert len(before) == 2
    if kind == "syntax":
        (workdir / "preload_lib.py").write_text('VERSION = "v2"\ndef broken(:\n')
        reason = r"mold \(pid \d+, generation 2\) exited with status 1: SyntaxError: .*\(preload_lib\.py, line 2\)"
    else:
        (workdir / "preload.json").write_text(json.dumps({"after_fork_fails": True}))
        reason = (r"worker \d \(pid \d+, generation 2\) exited with status 1: after_fork hook "
                  r"'reopen_connections' failed: ConnectionError: database unreachable on purpose")
    p.signal(signal.SIGHUP)
    line = p.wait_log(r"reload failed: .*; generation 1 keeps serving").group(0)
    assert re.search(reason, line), line
    got = answers(p)
    assert {a["version"] for a in got} == {"v1"} and {a["pid"] for a in got} <= before
    assert p.count_log(r"\[master\].*Traceback") == 0


def test_crashed_worker_is_forked_again_from_the_mold(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "1", PRELOAD]).started()
    mold = mold_pid(p, 1)
    first = answer(p)
    try:
        p.get("/crash")
    except Exception:  # noqa: BLE001 - the worker dies mid-request
        pass
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) exited with status 7")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)
    again = answer(p)
    assert again["pid"] != first["pid"]
    assert again["import_pid"] == mold and again["ppid"] == p.master_pid()
    assert len(record_lines(workdir / "imports.log")) == 1          # no new import
    assert len(record_lines(workdir / "after_fork.log")) == 2       # the hook ran in the new worker
    # SIGKILL too: the master sees the status, and the slot is forked again.
    os.kill(again["pid"], signal.SIGKILL)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) exited|killed by SIGKILL")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=3)
    assert answer(p)["import_pid"] == mold


def test_a_dead_mold_leaves_its_workers_serving_and_respawns_exec(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "1", PRELOAD]).started()
    mold = mold_pid(p, 1)
    worker = answer(p)["pid"]
    os.kill(mold, signal.SIGKILL)
    p.wait_log(r"mold \(pid \d+, generation 1\) killed by SIGKILL; generation 1's workers are exec'd")
    assert answer(p)["pid"] == worker
    os.kill(worker, signal.SIGKILL)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)
    a = answer(p)
    assert a["import_pid"] == a["pid"] != worker   # exec'd: it imported the app itself


HAZARDS = [("thread", r"error-reporter"), ("loop", r"socket fd \d+ connected to an unnamed peer"),
           ("sqlite", r"file \S+/app\.db open for writing \(fd \d+\)")]


@pytest.mark.parametrize("hazard, named", HAZARDS, ids=[h[0] for h in HAZARDS])
def test_unsafe_at_import_falls_back_to_exec(fugue_proc, workdir, hazard, named):
    (workdir / "preload.json").write_text(json.dumps({"hazard": hazard}))
    p = fugue_proc(["preload_app.py", "0", "2", PRELOAD]).started()
    line = p.wait_log(r"mold \(pid \d+, generation 1\): not fork-safe after the import "
                      r"\((.*)\); generation 1's workers are exec'd instead of forked").group(0)
    assert re.search(named, line), line
    got = answers(p)
    assert all(a["import_pid"] == a["pid"] for a in got)  # each imported the app itself
    assert sorted(int(w) for _, w, _ in record_lines(workdir / "after_fork.log")) == [1, 2]
    # Fixed code (nothing unsafe at import) is forked again on the next reload.
    (workdir / "preload.json").write_text("{}")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"worker \d \(pid \d+, generation 1\) stopped", count=2)
    mold = mold_pid(p, 2)
    assert {a["import_pid"] for a in answers(p)} == {mold}


def test_workers_as_nobody_never_run_app_code_as_root(fugue_proc, world_dir):
    for name in ("preload_app.py", "preload_lib.py"):
        assert os.path.exists(os.path.join(world_dir, name))
    work = os.path.join(world_dir, "wd")
    os.mkdir(work)
    os.chmod(work, 0o777)  # the app writes its logs here, as nobody
    opts = {"preload": True, "uid": "nobody", "gid": "nogroup", "working_path": work}
    p = fugue_proc([os.path.join(world_dir, "preload_app.py"), "0", "2", json.dumps(opts)],
                   cwd=world_dir, python=SYSTEM_PYTHON, env={"PYTHONPATH": world_dir}).started()
    mold = mold_pid(p, 1)
    with open(f"/proc/{mold}/status") as f:
        uids = re.search(r"^Uid:\s+(.*)$", f.read(), re.M).group(1).split()
    assert set(uids) == {"65534"}  # real, effective, saved, filesystem
    for a in answers(p):
        assert a["import_euid"] == a["euid"] == 65534 and a["import_pid"] == mold
    assert {euid for _, _, euid in record_lines(os.path.join(work, "after_fork.log"))} == {"65534"}


def test_usr2_new_master_forks_from_its_own_mold(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "2", PRELOAD]).started()
    old = p.master_pid()
    (workdir / "preload_lib.py").write_text('VERSION = "v2"\n')
    p.signal(signal.SIGUSR2)
    p.wait_log(r"upgrade done: new master pid (\d+) serving")
    new = int(p.wait_log(r"upgrade done: new master pid (\d+) serving").group(1))
    p.wait_log(r"master exiting")
    wait_for(lambda: p.master_pid() == new, what="the new master's pid file")
    mold = int(p.wait_log(rf"\[{new}\] \[master\] INFO started mold \(pid (\d+), generation 2\)").group(1))
    for a in answers(p):
        assert a["version"] == "v2" and a["import_pid"] == mold and a["ppid"] == new != old


def test_usr1_reopens_the_log_in_the_mold_and_forked_workers(fugue_proc, workdir):
    log = workdir / "fugue.log"
    p = fugue_proc(["preload_app.py", "0", "1", json.dumps({"preload": True, "log_file": str(log)})])
    text = wait_for(lambda: log.exists() and re.search(r"started: generation 1 serving", log.read_text())
                    and log.read_text(), what="the log")
    p._port = int(re.search(r"listening on [\d.]+:(\d+)", text).group(1))
    mold = int(re.search(r"started mold \(pid (\d+)", text).group(1))
    os.rename(log, workdir / "fugue.log.1")
    p.signal(signal.SIGUSR1)
    wait_for(lambda: log.exists() and "reopened log files" in log.read_text(), what="a new log")
    # A worker forked after the reopen writes to the new file (it inherits the mold's stderr).
    worker = answer(p)["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: re.search(r"worker 1 \(pid \d+, generation 1\) ready", log.read_text()), what="respawn")
    new = answer(p)
    assert new["import_pid"] == mold
    p.signal(signal.SIGTERM)
    p.wait_exit()
    assert f"[{new['pid']}] [worker 1] INFO draining" in log.read_text()
    assert f"[{new['pid']}]" not in (workdir / "fugue.log.1").read_text()


def test_status_shows_the_mold(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "2", PRELOAD]).started()
    mold = mold_pid(p, 1)
    out = subprocess.run([sys.executable, "-m", "fugue.ctl", "status", "--json"], cwd=workdir,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(m["pid"], m["generation"], m["state"]) for m in data["molds"]] == [(mold, 1, "ready")]
    assert all(w["mold"] == mold for w in data["workers"])
    out = subprocess.run([sys.executable, "-m", "fugue.ctl", "status"], cwd=workdir,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=30)
    assert re.search(rf"mold .*pid {mold}.*generation 1.*ready", out.stdout), out.stdout


def test_wsgi_warmup_runs_in_the_mold_first(fugue_proc, workdir):
    """With warmup, a WSGI app's first request is made in the mold, so its workers share what it built."""
    p = fugue_proc(["fuguectl", "start", "--app", "preload_wsgi:app", "--preload", "--warmup", "/",
                    "-w", "2", "--bind", "127.0.0.1:0"]).started()
    mold = mold_pid(p, 1)
    for a in answers(p, 8):
        assert a["first_call_pid"] == mold != a["pid"]


def test_routed_mode_apps_preload(fugue_proc, workdir):
    """Each app master of the router has its own mold; a reload of one app forks from a new one."""
    from test_router import ask, get, start_router

    p = start_router(fugue_proc, workdir, top="preload = true")
    molds = {int(m) for m in re.findall(r"started mold \(pid (\d+), generation 1\)", p.log())}
    assert len(molds) == 2
    for host, name in (("alpha.test", "alpha"), ("beta.test", "beta")):
        status_, body = get(p.port, host)
        assert status_ == 200 and body.startswith(f"{name} worker ")
        pid = int(re.search(r"pid (\d+)", body).group(1))
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rpartition(")")[2].split()[1])
        assert ppid not in molds  # forked from a mold, the child of its app master
    reply = ask(p, "reload", app="alpha")
    assert reply["ok"], reply
    p.wait_log(r"started mold \(pid \d+, generation 2\)")
    assert get(p.port, "alpha.test")[1].startswith("alpha worker ")


def test_rolling_reload_and_max_requests_fork_from_the_mold(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "2", json.dumps(
        {"preload": True, "reload_strategy": "rolling", "max_requests": 3})]).started()
    mold = mold_pid(p, 1)
    for _ in range(12):  # each worker recycles after 3 requests; its slot is forked again
        assert answer(p)["import_pid"] == mold
    p.wait_log(r"is recycling itself \(served 3 requests, max_requests 3\)")
    assert len(record_lines(workdir / "imports.log")) == 1
    (workdir / "preload_lib.py").write_text('VERSION = "v2"\n')
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    new = mold_pid(p, 2)
    p.wait_log(r"worker \d \(pid \d+, generation 1\) stopped", count=2)
    got = answers(p, 6)
    assert {a["version"] for a in got} == {"v2"} and {a["import_pid"] for a in got} == {new}


def test_watch_mode_with_preload_reloads_a_changed_module(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "1", json.dumps({"preload": True, "watch": True, "watch_settle": 0.3})]).started()
    assert answer(p)["version"] == "v1"
    (workdir / "preload_lib.py").write_text('VERSION = "v2"\n')
    p.wait_log(r"reload done: generation 2 serving")
    a = answer(p)
    assert a["version"] == "v2" and a["import_pid"] == mold_pid(p, 2)


@pytest.mark.parametrize("ready_at_import", [True, False])
def test_wait_ready_with_preload(fugue_proc, workdir, ready_at_import):
    """fugue.ready() called at import (in the mold) counts for every forked worker; without it,
    wait_ready keeps the generation from being promoted, and the start fails at ready_timeout."""
    (workdir / "preload.json").write_text(json.dumps({"ready_at_import": ready_at_import}))
    p = fugue_proc(["preload_app.py", "0", "2", json.dumps(
        {"preload": True, "wait_ready": True, "ready_timeout": 3})])
    if ready_at_import:
        p.started()
        assert {a["import_pid"] for a in answers(p)} == {mold_pid(p, 1)}
    else:
        assert p.wait_exit() == 1
        assert re.search(r"start failed: worker \d \(pid \d+, generation 1\) .*not ready after 3s", p.log())


def test_a_foreign_program_is_not_preloaded(fugue_proc, workdir):
    (workdir / "foreign_serve.py").write_text(
        "import http.server, os, socket\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = f'foreign {os.getpid()}'.encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "server = http.server.HTTPServer(('127.0.0.1', 0), H, bind_and_activate=False)\n"
        "server.socket = socket.socket(fileno=3)\n"
        "server.serve_forever()\n")
    p = fugue_proc(["fuguectl", "start", "--preload", "--bind", "127.0.0.1:0", "-w", "1",
                    "--stable-after", "0.2", "--", sys.executable, "foreign_serve.py"]).started()
    p.wait_log(r"preload does not apply to a foreign program")
    assert p.body().startswith("foreign ")
    assert "started mold" not in p.log()


def test_a_hung_forked_worker_is_killed_by_the_master_and_forked_again(fugue_proc, workdir):
    """Heartbeats and timeouts: the master signals a forked worker as its own child."""
    p = fugue_proc(["preload_app.py", "0", "1", json.dumps({"preload": True, "timeout": 1})]).started()
    mold = mold_pid(p, 1)
    hung = answer(p)["pid"]
    os.kill(hung, signal.SIGSTOP)
    p.wait_log(rf"killing worker 1 \(pid {hung}, generation 1\): no heartbeat for 1s")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)
    a = answer(p)
    assert a["pid"] != hung and a["import_pid"] == mold
