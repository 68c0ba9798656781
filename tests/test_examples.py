"""The examples users copy (examples/django, examples/flask, examples/fastapi) work as their
fugue.toml says: each is served with the real framework, reloaded under load with 0 failed
requests, and a broken edit is rolled back while the old generation keeps serving. FastAPI's
websocket works, survives a reload on its old worker and is closed with 1012 at graceful_timeout."""

import os
import re
import shlex
import shutil
import signal

import pytest

from conftest import ROOT
from test_adapters import Load

EXAMPLES = os.path.join(ROOT, "examples")

# example -> (the framework it needs, the file whose VERSION a reload changes, a broken edit)
CASES = {
    "django": ("django", "mysite/views.py", ("mysite/settings.py", "INSTALLED_APPS = [\n")),
    "flask": ("flask", "app.py", ("app.py", "from flask import Flask, NoSuchThing\n")),
    "fastapi": ("fastapi", "app.py", ("app.py", "app = FastAPI(\n")),
}


def copy_example(name, workdir):
    dest = workdir / name
    shutil.copytree(os.path.join(EXAMPLES, name), dest, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    return dest


def start_example(fugue_proc, workdir, name, *flags):
    pytest.importorskip(CASES[name][0], reason=f"the test extra installs {CASES[name][0]}")
    where = copy_example(name, workdir)
    # The example's own fugue.toml, with a free port: flags win over the file.
    return fugue_proc(["fuguectl", "start", "-c", "fugue.toml", "--bind", "127.0.0.1:0", *flags],
                      cwd=where).started(timeout=60), where


def set_version(path, version):
    text = path.read_text()
    path.write_text(re.sub(r'^VERSION = "[^"]*"', f'VERSION = "{version}"', text, flags=re.M))


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_reloads_under_load_and_rolls_back_a_broken_edit(fugue_proc, workdir, name):
    p, where = start_example(fugue_proc, workdir, name)
    assert f"hello from {name} worker" in p.body() and "generation 1 version v1" in p.body()
    load = Load(p.port)
    try:
        load.wait(lambda ld: ld.ok >= 30, "answers from generation 1")
        set_version(where / CASES[name][1], "v2")
        p.signal(signal.SIGHUP)
        p.wait_log(r"reload done: generation 2 serving", timeout=60)
        before = load.count("generation 2 version v2")
        load.wait(lambda ld: ld.count("generation 2 version v2") >= before + 30, "answers from generation 2")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.count("generation 1 version v1") > 0
    p.wait_log(r"generation 1\) stopped", count=2)

    broken, line = CASES[name][2]
    path = where / broken
    path.write_text(path.read_text() + line)
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: .*generation 2 keeps serving", timeout=60)
    assert "generation 2 version v2" in p.body()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_django_broken_view_is_rolled_back_by_warmup(fugue_proc, workdir):
    """Django imports views on the first request: only the example's `warmup = ["/"]` catches
    a view that no longer compiles before the new generation takes over."""
    p, where = start_example(fugue_proc, workdir, "django")
    views = where / "mysite" / "views.py"
    views.write_text(views.read_text().replace('VERSION = "v1"', 'VERSION = "v2"') + "\ndef broken(:\n")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: .*warmup GET / answered 500.*generation 1 keeps serving", timeout=60)
    assert "generation 1 version v1" in p.body()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_fastapi_websocket_survives_a_reload_then_closes_with_1012(fugue_proc, workdir):
    pytest.importorskip("websockets", reason="the asgi extra installs websockets")
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    p, where = start_example(fugue_proc, workdir, "fastapi", "--graceful-timeout", "3", "-w", "1")
    url = f"ws://127.0.0.1:{p.port}/ws"
    with connect(url, open_timeout=10) as ws:
        assert "generation 1 version v1" in ws.recv(timeout=10)
        ws.send("hello")
        assert ws.recv(timeout=10).startswith("hello (from fastapi worker 1")
        set_version(where / "app.py", "v2")
        p.signal(signal.SIGHUP)
        p.wait_log(r"reload done: generation 2 serving", timeout=60)
        assert "generation 2 version v2" in p.body()
        ws.send("still there")  # the websocket stays on its old worker while it drains
        assert "generation 1 version v1" in ws.recv(timeout=10)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)  # graceful_timeout (3 s) ends it
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    with connect(url, open_timeout=10) as ws:
        assert "generation 2 version v2" in ws.recv(timeout=10)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) stopped")
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_every_example_names_its_command_line():
    for name in CASES:
        with open(os.path.join(EXAMPLES, name, "fugue.toml")) as f:
            assert "fuguectl start -c fugue.toml" in f.read(), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_gunicorn_style_command_line_in_each_example_serves_it(fugue_proc, workdir, name):
    """Each example shows the command line a gunicorn user would type; it works as shown
    (from the example's directory, on a free port instead of 8000)."""
    pytest.importorskip(CASES[name][0], reason=f"the test extra installs {CASES[name][0]}")
    where = copy_example(name, workdir)
    lines = [line for path in where.iterdir() if path.is_file()
             for line in path.read_text().splitlines() if "fuguectl start -w" in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].split("fuguectl", 1)[1].replace("127.0.0.1:8000", "127.0.0.1:0"))
    p = fugue_proc(["fuguectl", *argv], cwd=where).started(timeout=60)
    assert f"hello from {name} worker" in p.body()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
