"""HUP reads the configuration again: the config file (-c) and the flags; a reload applies
what a worker generation carries and names what only an upgrade can (bind, uid, log files);
USR2 applies everything, bind included. An invalid file refuses the reload in one line."""

import os
import re
import signal
import socket
import subprocess
import sys

from conftest import ROOT, http_get, wait_for


def free_listener():
    """A bound, listening socket on a kernel-chosen port (handed in with fd: would hide the
    bind change; here the test only needs a port nobody else takes: it keeps it bound until
    fugue has its own, then closes it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def toml(workdir, **values):
    lines = ['script = "app.py"']
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f"{key} = {value}")
    (workdir / "fugue.toml").write_text("\n".join(lines) + "\n")


def ctl(p, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fugue.ctl", *args], cwd=p.cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=timeout)


def ready_workers(p, generation):
    return len(set(re.findall(rf"worker (\d+) \(pid \d+, generation {generation}\) ready", p.log())))


def serves(port):
    try:
        return http_get(port)[0] == 200
    except OSError:
        return False


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_reload_changes_split_what_a_generation_carries_from_what_needs_an_upgrade():
    from fugue import config

    old = config.build({"workers": 2, "bind": [":1"], "timeout": 30, "log_file": "a.log"}, start_dir="/srv")
    cases = [
        ({"workers": 3, "bind": [":1"], "timeout": 30, "log_file": "a.log"}, {"workers": 3}, []),
        ({"workers": 2, "bind": [":2"], "timeout": 5, "log_file": "a.log"}, {"timeout": 5.0}, ["bind"]),
        ({"workers": 2, "bind": [":1"], "timeout": 30, "log_file": "b.log", "uid": 7,
          "warmup": ["/"]}, {"warmup": ["/"]}, ["log_file", "uid"]),
        ({"workers": 2, "bind": [":1"], "timeout": 30, "log_file": "a.log"}, {}, []),
    ]
    for options, applied, needs in cases:
        new = config.build(options, start_dir="/srv")
        assert config.reload_changes(old, new) == (applied, needs), options


def test_bind_change_needs_an_upgrade_and_usr2_serves_it(fugue_proc, workdir):
    toml(workdir, bind=["127.0.0.1:0"], workers=1)
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    old_port = p.port
    probe = free_listener()
    new_port = probe.getsockname()[1]
    probe.close()
    toml(workdir, bind=[f"127.0.0.1:{new_port}"], workers=2)
    done = ctl(p, "reload")
    assert done.returncode == 0, done
    assert re.fullmatch(r"reload done: generation 2 serving \([\d.]+s\); bind changed: needs `fuguectl upgrade`\n",
                        done.stdout), done.stdout
    p.wait_log(r"reload: bind changed: needs `fuguectl upgrade`")
    p.wait_log(r"reload: workers -> 2")  # what a generation carries is applied all the same
    assert serves(old_port) and refused(new_port)
    old_master = p.master_pid()
    p.signal(signal.SIGUSR2)
    p.wait_log(r"upgrade done")
    wait_for(lambda: serves(new_port), 20, "the new address served")
    assert old_master == p.popen.pid
    p.wait_exit(30)  # the old master, once its workers drained
    assert refused(old_port)


def test_usr2_drops_a_unix_socket_no_longer_in_bind_once_the_old_master_is_gone(fugue_proc, workdir):
    toml(workdir, bind=["unix:a.sock"], workers=1)
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    a, b = str(workdir / "a.sock"), str(workdir / "b.sock")
    assert http_get(0, unix=a)[0] == 200
    toml(workdir, bind=["unix:b.sock"], workers=1)
    p.signal(signal.SIGUSR2)
    p.wait_log(r"upgrade done")
    wait_for(lambda: os.path.exists(b) and http_get(0, unix=b)[0] == 200, 20, "b.sock served")
    p.wait_exit(30)  # the old master
    wait_for(lambda: not os.path.exists(a), 10, "a.sock removed by the new master")
    assert http_get(0, unix=b)[0] == 200
