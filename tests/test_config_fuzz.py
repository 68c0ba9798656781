"""Property tests over option values, flags and TOML files (hypothesis).

Whatever a user writes, fugue answers with a Config or with one clear line: never a
traceback, and never a master that is half started. The pure layers (config.build,
`fuguectl check`) run in this process with many examples; a few real `fuguectl start`
runs check that an accepted value also starts and stops cleanly, and that a refused
one leaves nothing behind.
"""

import json
import math
import os
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import APPS, PY, ROOT, tagged_pids, wait_for
from fugue import config, ctl, ctlargs
from fugue.errors import ConfigError

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                           HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2, max_value=2 ** 70)
           | st.floats() | st.text(max_size=20) | st.sampled_from(["0", "-1", "1e300", "nan", "inf", "0x10",
                                                                     "TERM", "auto", "a:b", ":", "\0", " 3"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=6)
names = st.sampled_from(config.NAMES) | st.text(max_size=12)


def one_clear_line(text):
    assert text and "\n" not in text.strip() and "Traceback" not in text, text
    return text.strip()


@SETTINGS
@given(options=st.dictionaries(names, values, max_size=3))
def test_option_values_give_a_config_or_one_clear_line(options):
    try:
        cfg = config.build(options, start_dir="/srv/app")
    except ConfigError as e:
        line = one_clear_line(str(e))
        assert any(repr(name) in line or f" {name}:" in line for name in options), line
        return
    for name, value in options.items():  # accepted: every value is of its kind, in range
        kind = config.KINDS[name]
        got = cfg.values[name]
        if value is None or got is None:
            continue
        if kind.startswith("int"):
            assert isinstance(got, int) and not isinstance(got, bool) and 0 <= got <= config.INT_MAX
        elif kind.startswith("float"):
            assert isinstance(got, float) and math.isfinite(got) and 0 <= got <= config.SECONDS_MAX
        elif kind == "bool":
            assert isinstance(got, bool)
        elif kind == "list":
            assert isinstance(got, list) and all(isinstance(v, str) and v and "\0" not in v for v in got)
        elif kind in ("str", "path"):
            assert isinstance(got, str) and got and "\0" not in got


# -- TOML files and flags through `fuguectl check` -------------------------------------------------

def toml_key(key):
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (a lone surrogate makes it invalid TOML: fine)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


toml_scalars = (st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | st.sampled_from(["app.py", "fault:app", "127.0.0.1:0", "unix:/nonexistent/x.sock"]))
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=5)
toml_names = st.sampled_from(config.NAMES + list(ctlargs.TARGET_KEYS)) | st.text(max_size=10)


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWD", raising=False)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return tmp_path


def check(capsys, *args):
    """`fuguectl check ARGS` in this process: (exit status, stderr); never an exception."""
    rc = ctl.main(["check", *args])
    out, err = capsys.readouterr()
    assert rc in (0, 1, 2), (rc, out, err)
    assert "Traceback" not in err
    if rc == 2 and err.startswith("usage: "):  # argparse's own refusal: usage, then one error line
        assert re.fullmatch(r"fuguectl check: error: .+", err.strip().splitlines()[-1]), err
    elif rc:
        line = one_clear_line(err)
        assert line.startswith("fugue: "), line
    return rc, err.strip()


@SETTINGS
@given(doc=st.dictionaries(toml_names, toml_values, max_size=4))
def test_toml_files_are_accepted_or_refused_in_one_line(here, capsys, doc):
    text = "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())
    (here / "fugue.toml").write_text(text, errors="surrogatepass")
    rc, err = check(capsys, "-c", "fugue.toml")
    if rc:
        # the error names the file, or the target it could not use (app, script or command)
        assert any(word in err for word in ("fugue.toml", "app", "script", "command")), (text, err)


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_a_config_file(here, capsys, data):
    (here / "fugue.toml").write_bytes(data)
    check(capsys, "-c", "fugue.toml")


@SETTINGS
@given(name=st.sampled_from([n for n in config.NAMES if n not in ctlargs.NOT_FLAGS]),
       value=st.text(max_size=15) | st.sampled_from(["1e300", "99999999999999999999", "-0", "0o777", "nan"]))
def test_any_flag_value(here, capsys, name, value):
    if value.startswith("-"):
        value = " " + value  # argparse would take it for a flag: that is argparse's error, tested elsewhere
    check(capsys, f"{ctlargs.flag_of(name)}={value}")


# -- real starts: an accepted value serves and stops; a refused one leaves nothing ----------------

EXTREMES = [("backlog", "99999999999"), ("ready_timeout", "1e300"), ("timeout", "1e300"),
            ("graceful_timeout", "1e300"), ("timeout", "1000000"), ("graceful_timeout", "0.001"),
            ("max_memory", "99999999999999999999999"), ("max_requests", "99999999999999999999"),
            ("workers", "0"), ("umask", "7777"), ("tmp_path", "no/such/dir"), ("log_file", "/proc/nope/x.log"),
            ("uid", "99999999999999999999"), ("working_path", "app.py")]


@pytest.mark.parametrize("name, value", EXTREMES, ids=[f"{n}={v}" for n, v in EXTREMES])
def test_extreme_values_start_cleanly_or_leave_nothing(tmp_path, name, value):
    import shutil
    import signal

    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(os.path.join(APPS, "app.py"), work)
    tag = f"fuzz-{os.getpid()}-{name}"
    env = dict(os.environ, PYTHONPATH=ROOT, FUGUE_TEST_TAG=tag, SPT_NOENV="1", PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("INVOCATION_ID", None)
    log = open(work / "out.log", "wb")
    proc = subprocess.Popen([PY, "-m", "fugue.ctl", "start", "-w", "1", "--bind", "127.0.0.1:0",
                             f"{ctlargs.flag_of(name)}={value}", "app.py"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    text = lambda: (work / "out.log").read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: proc.poll() is not None or "started: generation 1 serving" in text()
                 or "start failed" in text(), 30, "the start to succeed or fail")
        if proc.poll() is None and "started: generation 1 serving" in text():
            from conftest import http_get

            port = int(re.search(r"listening on [\d.]+:(\d+)", text()).group(1))
            if name != "workers":
                assert http_get(port)[0] == 200
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0, text()
            assert "Traceback" not in text()
        else:
            rc = proc.wait(30)
            lines = [line for line in text().splitlines() if line.startswith("fugue: ")]
            assert rc != 0 and len(lines) == 1 and "Traceback" not in text(), text()
        assert not (work / "fugue.pid").exists()
        leftovers = os.listdir(work / "tmp") if (work / "tmp").is_dir() else []
        assert leftovers == [], leftovers
        wait_for(lambda: not tagged_pids(tag), 10, "nothing left running")
    finally:
        for pid in tagged_pids(tag) + [proc.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()


@SETTINGS
@given(port=st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
       host=st.none() | st.text(max_size=30) | st.sampled_from(["::1", "[::1]", "0.0.0.0", "localhost"]))
def test_start_arguments_become_binds_or_one_clear_line(port, host):
    """fugue.start(server, port, host, ...): the port and host a script passes."""
    import fugue
    from fugue.errors import FugueError
    from fugue.fds import parse_bind

    try:
        for spec in fugue._binds(port, host):
            parse_bind(spec)
    except FugueError as e:
        one_clear_line(str(e))
