"""Real frameworks under preload (issue 15, item 4): Django, Flask, FastAPI with a
websocket, Starlette with lifespan handlers. Each serves from workers forked from
its generation's mold, and survives a reload that forks a new generation."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, wait_for


def status(workdir):
    out = subprocess.run([sys.executable, "-m", "fugue.ctl", "status", "--json"], cwd=workdir,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start(fugue_proc, workdir, app, cwd=None):
    p = fugue_proc(["fuguectl", "start", "--app", app, "--preload", "-w", "2", "--bind", "127.0.0.1:0"],
                   cwd=cwd).started(40)
    return p


def assert_forked(p, cwd, generation=1):
    """Every worker was forked from the generation's mold and is the master's child."""
    data = status(cwd)
    molds = [m for m in data["molds"] if m["generation"] == generation]
    assert len(molds) == 1 and molds[0]["state"] == "ready", data["molds"]
    mold = molds[0]["pid"]
    live = [w for w in data["workers"] if w["generation"] == generation]
    assert len(live) == 2 and all(w["mold"] == mold for w in live), live
    for w in live:
        with open(f"/proc/{w['pid']}/stat") as f:
            assert int(f.read().rpartition(")")[2].split()[1]) == data["master"]["pid"]
    assert "not fork-safe" not in p.log()
    return mold, [w["pid"] for w in live]


def reload_ok(p, generation=2):
    p.signal(signal.SIGHUP)
    p.wait_log(rf"reload done: generation {generation} serving", 40)


def test_django_admin(fugue_proc, workdir):
    pytest.importorskip("django")
    (workdir / "site").mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(workdir / "site")],
                   check=True, timeout=60)
    site = workdir / "site"
    p = start(fugue_proc, workdir, "mysite.wsgi:application", cwd=site)
    status_, body, _ = p.get("/admin/login/")
    assert status_ == 200 and "Django administration" in body
    mold, _ = assert_forked(p, site)
    reload_ok(p)
    assert_forked(p, site, 2)
    assert "Django administration" in p.get("/admin/login/")[1]


def test_flask(fugue_proc, workdir):
    pytest.importorskip("flask")
    p = start(fugue_proc, workdir, "flask_app:app")
    assert p.body().startswith("flask ok from ")
    _, pids = assert_forked(p, workdir)
    assert {int(p.body().split()[-1]) for _ in range(12)} <= set(pids)
    reload_ok(p)
    assert_forked(p, workdir, 2)


def test_fastapi_websocket(fugue_proc, workdir):
    pytest.importorskip("fastapi")
    sync_client = pytest.importorskip("websockets.sync.client")
    p = start(fugue_proc, workdir, "fastapi_ws_app:app")
    _, pids = assert_forked(p, workdir)
    with sync_client.connect(f"ws://127.0.0.1:{p.port}/ws", open_timeout=10) as ws:
        for i in range(3):
            ws.send(f"hi {i}")
            reply = ws.recv(timeout=10)
            assert re.fullmatch(rf"echo hi {i} from (\d+)", reply) and int(reply.split()[-1]) in pids
    reload_ok(p)
    assert_forked(p, workdir, 2)
    with sync_client.connect(f"ws://127.0.0.1:{p.port}/ws", open_timeout=10) as ws:
        ws.send("again")
        assert ws.recv(timeout=10).startswith("echo again from ")


def test_starlette_lifespan_runs_in_each_worker(fugue_proc, workdir):
    pytest.importorskip("starlette")
    p = start(fugue_proc, workdir, "starlette_lifespan_app:app")
    mold, pids = assert_forked(p, workdir)
    wait_for(lambda: (workdir / "lifespan.log").exists()
             and len((workdir / "lifespan.log").read_text().split("\n")) > 2, what="two lifespan startups")
    started = {int(line.split()[1]) for line in (workdir / "lifespan.log").read_text().splitlines()}
    assert started == set(pids) and mold not in started
    for _ in range(8):
        a = json.loads(p.body())
        assert a["started_in"] == a["pid"] in pids
