"""The shipped units under a real systemd 252, booted in a container (tests/sdbox.py).

One container per module: booting takes seconds. Each test runs its own instance
(fugue@NAME, /etc/fugue/NAME.toml, its own port) and stops it afterwards, so a failed
test leaves nothing running for the next one; the container goes at the module's end.
Clients run inside the container (it has a private network): curl for single
requests, bench/loadgen.py for load, counting every request's outcome exactly.
"""

import json
import subprocess

import pytest

from conftest import wait_for
from sdbox import SRC, VENV, BootFailed, Box, why_not

pytestmark = pytest.mark.timeout(300)

APP_DIR = "/srv/fugue-apps"

LOAD_DRIVER = f"""
import json, sys
sys.path.insert(0, "{SRC}/bench")
import loadgen
host, port, conns, keepalive = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
load = loadgen.Load(host, port, conns=conns, keepalive=keepalive, timeout=20.0).start()
print("started", flush=True)
sys.stdin.readline()
r = load.stop()
print(json.dumps({{"ok": r.ok, "failures": dict(r.failures),
                  "samples": {{k: str(v) for k, v in r.failure_samples.items()}},
                  "down_s": sum(b - a for a, b in r.down_spans()) if hasattr(r, "down_spans") else None}}))
"""


@pytest.fixture(scope="module")
def box():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    b = Box()
    try:
        try:
            b.boot()
        except BootFailed as e:
            if e.machine_cannot:
                pytest.skip(str(e))
            pytest.fail(f"could not boot systemd in a container: {e}")
        b.sh(f"mkdir -p {APP_DIR} /etc/fugue && cp {SRC}/apps/*.py {APP_DIR}/ && "
             f"cp {SRC}/contrib/systemd/fugue@.service {SRC}/contrib/systemd/fugue@.socket /etc/systemd/system/ "
             "&& systemctl daemon-reload", check=True)
        b.write(f"{SRC}/drive_load.py", LOAD_DRIVER)
        yield b
    finally:
        b.close()


class Instance:
    """fugue@NAME in the box: its config, its port, and the means to drive it."""

    def __init__(self, box, name, port, extra=""):
        self.box, self.name, self.port = box, name, port
        self.unit = f"fugue@{name}.service"
        self.dir = f"{APP_DIR}/{name}"
        box.sh(f"mkdir -p {self.dir} && cp {APP_DIR}/*.py {self.dir}/", check=True)
        bind = f'bind = ["127.0.0.1:{port}"]\n' if port else ""
        self.toml = f"/etc/fugue/{name}.toml"
        box.write(self.toml, f'script = "{self.dir}/app.py"\nworking_path = "{self.dir}"\n{bind}'
                             f'pid_file = "/run/fugue/{name}/fugue.pid"\ntmp_path = "/run/fugue/{name}"\n'
                             f"workers = 2\ngraceful_timeout = 10\nready_timeout = 20\n{extra}")

    def behaviour(self, **kw):
        self.box.write(f"{self.dir}/behaviour.json", json.dumps(kw))

    def ctl(self, *args, timeout=60.0):
        return self.box.systemctl(*args, self.unit, timeout=timeout)

    def show(self, prop):
        return self.box.show(self.unit, prop)

    def master_pid(self):
        text = self.box.run(["cat", f"/run/fugue/{self.name}/fugue.pid"]).stdout.strip()
        return int(text) if text.isdigit() else None

    def curl(self, path="/", unix=None, timeout=30):
        where = ["--unix-socket", unix] if unix else []
        r = self.box.run(["curl", "-sS", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}"] + where
                         + [f"http://127.0.0.1:{self.port or 80}{path}"], timeout=timeout + 10)
        body, _, code = r.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def slow_request(self, seconds):
        """A request that takes `seconds` to answer, started now: a Popen whose stdout is the status."""
        return self.box.popen(["curl", "-sS", "-m", "60", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://127.0.0.1:{self.port}/slow?s={seconds}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def load(self, conns=8, keepalive=True):
        return Load(self.box, self.port, conns, keepalive)

    def wait_serving(self, timeout=30.0):
        return wait_for(lambda: self.curl(timeout=5)[0] == 200, timeout, f"{self.unit} to answer")

    def in_flight(self, timeout=15.0):
        """Wait until a worker is busy with a request (the /slow one the test started)."""
        last = []

        def busy():
            # as the unit's User=: root does not trust a pid file another user can write
            r = self.box.run(["runuser", "-u", "www-data", "--", "fuguectl", "status", "--json", "-c", self.toml])
            last[:] = [r.stdout[-300:] + r.stderr]
            return r.returncode == 0 and json.loads(r.stdout)["totals"].get("in_flight", 0) > 0
        try:
            return wait_for(busy, timeout, "a request in flight in a worker")
        finally:
            print("last status:", last)

    def stop(self):
        self.ctl("stop", timeout=90)
        self.box.systemctl("reset-failed", self.unit)


class Load:
    """bench/loadgen.py running inside the box until .stop() (then its counts as a dict)."""

    def __init__(self, box, port, conns, keepalive):
        self.proc = box.popen([f"{VENV}/bin/python3", f"{SRC}/drive_load.py", "127.0.0.1", str(port),
                               str(conns), "1" if keepalive else "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "started", line + self.proc.stderr.read()

    def stop(self):
        out, err = self.proc.communicate("stop\n", timeout=60)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def instance(box, request):
    made = []

    def make(name, port, extra=""):
        inst = Instance(box, name, port, extra)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop()


# -- the tests --------------------------------------------------------------------------------

def test_start_reaches_active_and_serves(instance):
    inst = instance("hello", 8101)
    r = inst.ctl("start")
    assert r.returncode == 0, r.stderr + inst.box.journal(inst.unit)
    assert inst.show("ActiveState") == "active"
    status, body = inst.curl()
    assert status == 200 and body.startswith("hello from worker"), body
    assert int(inst.show("MainPID")) > 0


def test_three_reloads_under_load_then_a_graceful_stop(instance):
    """systemctl reload x3 with 0 failed; then stop: an in-flight 3 s request answers 200, unit inactive."""
    inst = instance("reload", 8103)
    assert inst.ctl("start").returncode == 0, inst.box.journal(inst.unit)
    main_pid = int(inst.show("MainPID"))
    masters = [inst.master_pid()]
    load = inst.load()
    try:
        for i in range(3):
            r = inst.ctl("reload", timeout=90)
            assert r.returncode == 0, r.stderr + inst.box.journal(inst.unit)[-3000:]
            masters.append(inst.master_pid())
            assert inst.show("ActiveState") == "active"
            # The process systemd started stays its main process; the master behind it is new.
            assert int(inst.show("MainPID")) == main_pid
            assert inst.box.alive(main_pid)
        result = load.stop()
    finally:
        load.kill()
    assert len(set(masters)) == 4, masters
    assert result["ok"] > 0 and result["failures"] == {}, result
    slow = inst.slow_request(3)
    try:
        inst.in_flight()
        r = inst.ctl("stop", timeout=90)
        assert r.returncode == 0, r.stderr
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert out == "200", (out, err, inst.box.journal(inst.unit)[-3000:])
    assert inst.show("ActiveState") == "inactive", inst.show("Result")
    assert inst.show("Result") == "success"


def test_kill9_of_the_master_refuses_nothing(instance):
    """kill -9 of the master under load: nothing refused, nothing failed but what was in flight there."""
    inst = instance("kill9", 8104)
    assert inst.ctl("start").returncode == 0, inst.box.journal(inst.unit)
    main_pid = int(inst.show("MainPID"))
    master = inst.master_pid()
    slow = inst.slow_request(3)
    inst.in_flight()
    load = inst.load(conns=4, keepalive=False)
    try:
        inst.box.run(["kill", "-9", str(master)], check=True)
        wait_for(lambda: inst.master_pid() not in (None, master), 30, "a replacement master")
        inst.wait_serving()
        result = load.stop()
    finally:
        load.kill()
    out, err = slow.communicate(timeout=60)
    assert out == "200", (out, err)  # the worker of the dead master finished its request
    assert result["failures"] == {}, result
    assert inst.show("ActiveState") == "active"
    assert int(inst.show("MainPID")) == main_pid
    assert int(inst.show("NRestarts")) == 0  # fugue replaced its master; systemd restarted nothing


def test_broken_reload_fails_with_the_reason(instance):
    inst = instance("broken", 8105)
    assert inst.ctl("start").returncode == 0, inst.box.journal(inst.unit)
    master = inst.master_pid()
    inst.behaviour(raise_at_import=True)
    r = inst.ctl("reload", timeout=90)
    assert r.returncode != 0
    assert "broken at import on purpose" in inst.show("StatusText")
    assert inst.show("ActiveState") == "active"
    assert inst.master_pid() == master
    assert inst.curl()[0] == 200


def test_journal_has_a_failed_reload_at_priority_err(instance):
    inst = instance("prio", 8107)
    assert inst.ctl("start").returncode == 0, inst.box.journal(inst.unit)
    inst.behaviour(raise_at_import=True)
    assert inst.ctl("reload", timeout=90).returncode != 0
    errors = inst.box.journal(inst.unit, "-p", "err")
    assert "broken at import on purpose" in errors, inst.box.journal(inst.unit)[-3000:]
    # and only errors are there: the serving lines are info
    assert "started: generation" not in errors


def test_socket_unit_with_tcp_and_unix_activates_on_first_connection(instance, box):
    """The shipped socket unit as it is: 127.0.0.1:8080 and /run/fugue-NAME.sock, one service as www-data."""
    inst = instance("sock", 8080)
    box.write(inst.toml, f'script = "{inst.dir}/app.py"\nworking_path = "{inst.dir}"\n'
                         'pid_file = "/run/fugue/sock/fugue.pid"\ntmp_path = "/run/fugue/sock"\n'
                         "workers = 2\ngraceful_timeout = 10\n")  # no bind: the sockets come from systemd
    try:
        r = box.systemctl("start", "fugue@sock.socket")
        assert r.returncode == 0, r.stderr
        assert inst.show("ActiveState") == "inactive"
        status, body = inst.curl()
        assert status == 200, body + box.journal(inst.unit)[-3000:]
        wait_for(lambda: inst.show("ActiveState") == "active", 30, "the service to be active")
        status, body = inst.curl(unix="/run/fugue-sock.sock")
        assert status == 200, body
        ids = json.loads(inst.curl("/ids")[1])
        assert ids["uid"] == ids["euid"] == 33  # www-data: the socket unit bound, nothing runs as root
        users = box.run(["ps", "-o", "user=", "--ppid", inst.show("MainPID"), "-p", inst.show("MainPID")]).stdout
        assert set(users.split()) == {"www-data"}, users
        # a restart of the whole service: the sockets stay, nothing is refused
        assert box.systemctl("restart", inst.unit).returncode == 0
        assert inst.curl()[0] == 200
        # kill -9 of the master with the socket unit: the keeper starts a new one, systemd nothing
        restarts, master = inst.show("NRestarts"), inst.master_pid()
        box.run(["kill", "-9", str(master)], check=True)
        wait_for(lambda: inst.master_pid() not in (None, master), 30, "a replacement master")
        assert inst.curl()[0] == 200 and inst.curl(unix="/run/fugue-sock.sock")[0] == 200
        assert inst.show("NRestarts") == restarts and inst.show("ActiveState") == "active"
    finally:
        box.systemctl("stop", "fugue@sock.socket")
