"""Nothing the operator asks for is lost: a HUP, USR2 or `fuguectl reload` that arrives while a
rollout or an upgrade is under way waits its turn (several of one kind coalesce), and the one
that runs reads the code on disk when it begins; so after the last HUP the code on disk then
ends up serving. A draining generation never holds a reload up. HUP reads the config file
again (see test_reconfig.py for what it cannot apply)."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_for
from test_reconfig import ctl, toml


def versions(p, n=12):
    return {re.search(r"version (\S+)", p.body()).group(1) for _ in range(n)}


def behave(workdir, **behaviour):
    (workdir / "behaviour.json").write_text(json.dumps(behaviour))


def test_hup_during_the_first_generations_start_ends_on_the_new_code(fugue_proc, workdir):
    behave(workdir, ready_delay=1.5, version="v1")
    p = fugue_proc(["app.py", "0", "2"])
    p.wait_log(r"starting generation 1")
    behave(workdir, ready_delay=0.1, version="v2")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload \(HUP\) waits its turn: generation 1 is still starting")
    p.wait_log(r"started: generation 1 serving")
    p.wait_log(r"reload done: generation 2 serving")
    assert versions(p) == {"v2"}


def test_two_hups_during_one_rollout_end_on_the_second_code(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2"]).started()
    behave(workdir, ready_delay=1.0, version="v2")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload \(HUP\): starting generation 2")
    behave(workdir, ready_delay=0.3, version="v3")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 3 serving")
    assert versions(p) == {"v3"}
    assert "refused" not in p.log()


def test_twenty_hups_in_one_second_end_on_the_code_of_the_last(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2"]).started()
    for i in range(1, 21):
        behave(workdir, version=f"v{i}")
        p.signal(signal.SIGHUP)
        time.sleep(0.05)  # the storm's own pace: 20 in one second
    wait_for(lambda: versions(p, 6) == {"v20"}, 60, "the code of the last HUP serving")
    assert "refused" not in p.log()
    assert p.count_log(r"joins the reload already waiting") >= 1


def test_fuguectl_reload_waits_its_turn_and_hears_its_own_outcome(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    behave(workdir, ready_delay=2.5, version="v2")  # long enough to look at the status meanwhile
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.Popen([sys.executable, "-m", "fugue.ctl", "reload"], cwd=workdir, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.wait_log(r"reload \(fuguectl\): starting generation 2")
    second = subprocess.Popen([sys.executable, "-m", "fugue.ctl", "reload"], cwd=workdir, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.wait_log(r"reload \(fuguectl\) waits its turn: generation 2 is still starting")
    shown = ctl(p, "status").stdout
    assert re.search(r"^asked     reload \(fuguectl\): waits its turn$", shown, re.M), shown
    assert second.wait(30) == 0 and re.fullmatch(r"reload done: generation 3 serving \([\d.]+s\)\n",
                                                 second.stdout.read())
    assert first.wait(30) == 0 and "generation 2 serving" in first.stdout.read()


def test_reloads_go_on_while_an_old_generation_holds_a_long_lived_connection(fugue_proc, workdir):
    """graceful_timeout is 30 s: each reload below completes long before it (ctl gives up at 20 s)."""
    p = fugue_proc(["app.py", "0", "1", json.dumps({"graceful_timeout": 30})]).started()
    held = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    held.request("GET", "/")
    assert "generation 1 " in held.getresponse().read().decode()
    for gen in (2, 3, 4):
        done = ctl(p, "reload", "--wait", "20")
        assert done.returncode == 0 and f"generation {gen} serving" in done.stdout, done
    # The idle keep-alive connection kept its own worker of generation 1, draining.
    data = json.loads(ctl(p, "status", "--json").stdout)
    draining = [w for w in data["workers"] if w["state"] == "draining"]
    assert [w["generation"] for w in draining] == [1] and draining[0]["connections"] == 1, draining
    held.request("GET", "/")
    resp = held.getresponse()
    assert "generation 1 " in resp.read().decode() and resp.getheader("Connection") == "close"
    held.close()
    wait_for(lambda: "generation 1) stopped" in p.log(), 10, "generation 1's worker to finish")
    assert versions(p) == {"v1"} and "generation 4 " in p.body()


def test_hup_applies_workers_from_the_config_file(fugue_proc, workdir):
    toml(workdir, bind=["127.0.0.1:0"], workers=2)
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    toml(workdir, bind=["127.0.0.1:0"], workers=3, timeout=20)
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload: workers -> 3, timeout -> 20\.0")
    p.wait_log(r"reload done: generation 2 serving")
    assert len(set(re.findall(r"worker (\d) \(pid \d+, generation 2\) ready", p.log()))) == 3
    data = json.loads(ctl(p, "status", "--json").stdout)
    assert data["master"]["workers_wanted"] == 3 and len(data["workers"]) == 3


def test_an_invalid_config_file_refuses_the_reload_in_one_line(fugue_proc, workdir):
    toml(workdir, bind=["127.0.0.1:0"], workers=1)
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    (workdir / "fugue.toml").write_text('script = "app.py"\nworkers = \n')
    done = ctl(p, "reload")  # the pid file is beside the file, as without -c
    assert done.returncode == 1 and done.stdout == "", done
    assert re.fullmatch(r"fugue: reload refused: config file fugue\.toml: not valid TOML: .*; "
                        r"generation 1 keeps serving\n", done.stderr), done.stderr
    assert p.body().startswith("hello from worker 1") and "generation 2" not in p.log()


def test_reloads_go_on_while_a_websocket_holds_its_old_worker(fugue_proc, workdir):
    """FastAPI, graceful_timeout 30 s: three reloads in a row all complete (each well within
    the 20 s ctl waits), while the websocket stays on its generation-1 worker and answers."""
    pytest.importorskip("websockets", reason="the asgi extra installs websockets")
    from websockets.sync.client import connect

    from test_examples import set_version, start_example

    p, where = start_example(fugue_proc, workdir, "fastapi", "--graceful-timeout", "30", "-w", "1")
    with connect(f"ws://127.0.0.1:{p.port}/ws", open_timeout=10) as ws:
        assert "generation 1 version v1" in ws.recv(timeout=10)
        for gen in (2, 3, 4):
            set_version(where / "app.py", f"v{gen}")
            done = ctl(p, "reload", "--wait", "20")
            assert done.returncode == 0 and f"generation {gen} serving" in done.stdout, done
            assert f"generation {gen} version v{gen}" in p.body()
        ws.send("still there")
        assert "generation 1 version v1" in ws.recv(timeout=10)


SCRIPT = """
import json
import sys

with open("opts.json") as f:
    OPTS = json.load(f)
sys.argv = ["app.py", "0", str(OPTS["workers"]), json.dumps({"timeout": OPTS["timeout"]})]
import app  # noqa: E402 - tests/apps/app.py: fugue.start(server, port, host, workers, options)

app.main()
"""


def test_hup_applies_what_the_scripts_own_fugue_start_now_asks_for(fugue_proc, workdir):
    """python served.py, no fuguectl: the options are the script's own; its new code says 3
    workers and another timeout, and the reload's generation takes over with them."""
    (workdir / "served.py").write_text(SCRIPT)
    (workdir / "opts.json").write_text(json.dumps({"workers": 2, "timeout": 30}))
    p = fugue_proc(["served.py"]).started()
    (workdir / "opts.json").write_text(json.dumps({"workers": 3, "timeout": 20}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"reload: workers -> 3, timeout -> 20\.0")
    p.wait_log(r"worker 3 \(pid \d+, generation 2\) ready")
    data = json.loads(ctl(p, "status", "--json").stdout)
    assert data["master"]["workers_wanted"] == 3
    assert {w["generation"] for w in data["workers"] if w["state"] == "ready"} == {2}
