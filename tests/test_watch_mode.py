"""Watch mode, end to end: a real master reloading on real file changes.

"No reload" is shown without sleeping: after the change that must be ignored, a
sentinel change that must reload is made, and the one reload that follows names
only the sentinel.
"""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, wait_for

WATCH = {"watch": True, "watch_settle": 0.3}


def start(fugue_proc, options=None, workers="1"):
    opts = dict(WATCH, **(options or {}))
    return fugue_proc(["app.py", "0", workers, json.dumps(opts)]).started()


def edit_version(workdir, version):
    path = workdir / "app.py"
    text = path.read_text()
    text = re.sub(r'BEHAVIOUR.get\("version", "[^"]*"\)', f'BEHAVIOUR.get("version", "{version}")', text)
    path.write_text(text)


def version(p):
    return re.search(r"version (\S+)", p.body()).group(1)


def test_edit_reloads_new_code(fugue_proc, workdir):
    p = start(fugue_proc)
    assert version(p) == "v1"
    edit_version(workdir, "v2")
    p.wait_log(r"changed: app\.py")
    p.wait_log(r"reload \(watch\): starting generation 2")
    p.wait_log(r"reload done: generation 2 serving")
    assert version(p) == "v2"


def test_syntax_error_keeps_old_code_then_next_good_save_reloads(fugue_proc, workdir):
    p = start(fugue_proc)
    good = (workdir / "app.py").read_text()
    (workdir / "app.py").write_text(good + "\ndef broken(:\n")
    line = p.wait_log(r"reload failed: .*SyntaxError.*\(app\.py, line \d+\); generation 1 keeps serving").group(0)
    assert "worker 1" in line
    assert version(p) == "v1"
    (workdir / "app.py").write_text(good.replace('"version", "v1"', '"version", "v3"'))
    p.wait_log(r"reload done: generation 3 serving")
    assert version(p) == "v3"


def test_fifty_files_over_two_seconds_one_reload(fugue_proc, workdir):
    import time

    p = start(fugue_proc, {"watch_settle": 0.5})
    pkg = workdir / "pkg"
    pkg.mkdir()
    for i in range(50):
        (pkg / f"m{i}.py").write_text(f"X = {i}\n")
        time.sleep(0.04)  # an upload in progress: 50 files over about 2 s
    p.wait_log(r"reload done: generation 2 serving")
    edit_version(workdir, "v2")  # the sentinel
    p.wait_log(r"reload done: generation 3 serving")
    assert p.count_log(r"reload \(watch\)") == 2
    changed = re.findall(r"changed: (.*)", p.log())
    assert "and 45 more" in changed[0]  # all 50 in one batch
    assert changed[1].strip() == "app.py"


def test_ignored_paths_do_not_reload(fugue_proc, workdir):
    log_file = workdir / "watched.log"
    fugue_proc(["app.py", "0", "1", json.dumps(dict(WATCH, log_file=str(log_file)))])
    wait_for(lambda: log_file.exists() and "started: generation 1" in log_file.read_text(), what="start")
    cache = workdir / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "app.cpython-311.pyc").write_bytes(b"junk")
    (cache / "extra.py").write_text("x = 1\n")
    (workdir / ".app.py.swp").write_text("swap")
    (workdir / "tmp" / "stray.py").write_text("x = 1\n")
    (workdir / "notes.txt").write_text("not python")
    edit_version(workdir, "v2")  # the sentinel
    wait_for(lambda: "reload done: generation 2" in log_file.read_text(), what="the sentinel reload")
    log = log_file.read_text()
    assert log.count("reload (watch)") == 1
    assert re.findall(r"changed: (.*)", log) == ["app.py"]


def test_watch_off_and_on(fugue_proc, workdir):
    p = start(fugue_proc)
    ctl = [sys.executable, "-m", "fugue.ctl"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(ctl + ["watch", "off"], cwd=workdir, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (workdir / "ignored_while_off.py").write_text("x = 1\n")
    out = subprocess.run(ctl + ["watch", "on"], cwd=workdir, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    edit_version(workdir, "v2")
    p.wait_log(r"reload done: generation 2 serving")
    assert re.findall(r"changed: (.*)", p.log()) == ["app.py"]
    assert version(p) == "v2"


def test_change_during_a_reload_gets_one_more_reload(fugue_proc, workdir):
    p = start(fugue_proc)
    (workdir / "behaviour.json").write_text(json.dumps({"ready_delay": 1.0}))
    edit_version(workdir, "v2")
    p.wait_log(r"reload \(watch\): starting generation 2")
    edit_version(workdir, "v3")  # while generation 2 is still starting
    p.wait_log(r"reload done: generation 3 serving", timeout=20)
    assert p.count_log(r"reload \(watch\)") == 2
    assert version(p) == "v3"


def test_fuguectl_start_watch(fugue_proc, workdir):
    p = fugue_proc(["fuguectl", "start", "--watch", "--watch-settle", "0.2", "-w", "1",
                    "--bind", "127.0.0.1:0", "app.py"]).started()
    edit_version(workdir, "v2")
    p.wait_log(r"reload done: generation 2 serving")
    assert version(p) == "v2"
