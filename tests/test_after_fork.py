"""fugue.after_fork in exec'd workers, and the mold's fork-hazard detection (fugue.mold)."""

import json
import os
import re
import socket
import threading

from conftest import record_lines
from fugue import mold


def test_after_fork_runs_once_in_each_execd_worker(fugue_proc, workdir):
    p = fugue_proc(["preload_app.py", "0", "2"]).started()
    seen = {}
    for _ in range(16):
        a = json.loads(p.body())
        seen[a["pid"]] = a
    for a in seen.values():
        assert a["import_pid"] == a["pid"] and a["hooked"] == [a["worker"]]
    hooked = record_lines(workdir / "after_fork.log")
    assert sorted(int(w) for _, w, _ in hooked) == [1, 2] and len({pid for pid, _, _ in hooked}) == 2


def test_a_failing_after_fork_hook_fails_the_start_with_the_reason(fugue_proc, workdir):
    (workdir / "preload.json").write_text(json.dumps({"after_fork_fails": True}))
    p = fugue_proc(["preload_app.py", "0", "1"])
    assert p.wait_exit() == 1
    assert re.search(r"fugue: start failed: worker 1 \(pid \d+, generation 1\) exited with status 1: "
                     r"after_fork hook 'reopen_connections' failed: ConnectionError: database unreachable "
                     r"on purpose \(preload_app\.py, line \d+\)", p.log()), p.log()[-2000:]


def test_fork_hazards_names_threads_connections_and_writable_files(tmp_path):
    baseline = set(mold.fork_hazards())  # pytest's own capture files, open for writing
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="error-reporter")
    t.start()
    a, b = socket.socketpair()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    db = open(tmp_path / "app.db", "w+b")
    log = open(tmp_path / "app.log", "ab")
    readonly = open(tmp_path / "app.db", "rb")
    try:
        found = [h for h in mold.fork_hazards() if h not in baseline]
        assert "error-reporter" in found
        assert f"socket fd {a.fileno()} connected to an unnamed peer" in found
        assert f"file {tmp_path / 'app.db'} open for writing (fd {db.fileno()})" in found
        text = " ".join(found)
        for ok in (listening, log, readonly):  # listening sockets, append-mode logs, read-only files
            assert f"fd {ok.fileno()})" not in text and f"fd {ok.fileno()} " not in text
        kept = mold.fork_hazards(keep={a.fileno(), b.fileno(), db.fileno()})
        assert [h for h in kept if h not in baseline] == ["error-reporter"]
    finally:
        stop.set()
        t.join()
        for f in (a, b, listening, db, log, readonly):
            f.close()
    assert set(mold.fork_hazards()) == baseline


def test_native_threads_are_found_too():
    """A thread started outside Python's threading module (as a C extension would) is named by
    its /proc comm; _thread.start_new_thread is the closest stand-in that threading does not list."""
    import _thread

    started, stop = threading.Event(), threading.Event()

    def run():
        started.set()
        stop.wait()

    baseline = set(mold.fork_hazards())
    _thread.start_new_thread(run, ())
    started.wait(10)
    try:
        found = [h for h in mold.fork_hazards() if h not in baseline]
        assert len(found) == 1 and ("native thread" in found[0] or "Dummy" in found[0]), found
    finally:
        stop.set()
