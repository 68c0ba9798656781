"""Every documented way to start fugue runs, as documented (issue 11 item 5).

    python3 examples/hello.py            README "Install", examples/hello.py
    fuguectl start ...                   the console script itself, not python -m fugue.ctl
    python -m fugue.router -c apps.toml  in test_router.py

hello.py listens on the fixed 127.0.0.1:4000 it documents: it runs in a network
namespace of its own (unshare -n), with the client, so that no other process on
the machine can hold that port or be reached by mistake.
"""

import os
import shutil
import subprocess

import pytest

from conftest import PY, ROOT

DRIVER = r'''
import os, signal, subprocess, sys, time, urllib.request
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
hello = subprocess.Popen([sys.executable, os.path.join(sys.argv[1], "examples", "hello.py")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
deadline = time.monotonic() + 30
body = None
while body is None and time.monotonic() < deadline and hello.poll() is None:
    try:
        body = urllib.request.urlopen("http://127.0.0.1:4000/", timeout=5).read().decode()
    except OSError:
        time.sleep(0.05)
os.killpg(hello.pid, signal.SIGINT)  # Ctrl-C at the terminal: the whole foreground group
out = hello.communicate(timeout=30)[0].decode()
print(repr(body))
print("exit", hello.returncode)
print(out)
'''


def test_python3_examples_hello_py_serves_on_4000_and_ctrl_c_stops_it(fugue_proc, workdir):
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    (workdir / "driver.py").write_text(DRIVER)
    p = fugue_proc(["unshare", "-n", PY, str(workdir / "driver.py"), ROOT], env={"PYTHONPATH": ""})
    assert p.wait_exit(90) == 0, p.log()
    out = p.log()
    assert "'hello from worker " in out and " generation 1\\n'" in out, out
    assert "exit 0" in out, out
    assert "Traceback" not in out, out
    assert p.pids() == []


def test_the_fuguectl_console_script_runs(tmp_path):
    """The `fuguectl` installed by pip (setup.cfg console_scripts) is fugue.ctl:main."""
    exe = shutil.which("fuguectl")
    if exe is None:
        pytest.skip("fuguectl is not installed (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "usage: fuguectl" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([exe, "status"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 3 and done.stderr.startswith("fugue: "), done.stderr  # no master running here
