"""Config files and flags: every option is both, every bad value is one clear line.

`fuguectl check` runs in this process (fugue.ctl.main): it starts nothing, so
these are table tests over config.OPTIONS, with real files.
"""

import json
import sys

import pytest

from fugue import config, ctl, ctlargs

BAD = {  # kind -> (a bad TOML value as written in the file, the same as a flag value or None)
    "int+": ("0", "0"),
    "int0": ("-1", "-1"),
    "float+": ("0", "0"),
    "float0": ("-0.5", "-0.5"),
    "bool": ('"maybe"', None),
    "str": ("5", ""),
    "path": ('""', ""),
    "list": ("[1, 2]", ""),
    "id": ("true", ""),
    "callable": ('"nocolon"', "nocolon"),
}


def bad_for(kind):
    return BAD.get(kind) or ('"nope"', "nope")  # choice:...


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWD", raising=False)
    (tmp_path / "tmp").mkdir()
    return tmp_path


def check(capsys, *args):
    rc = ctl.main(["check", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out.strip(), err.strip()


@pytest.mark.parametrize("name,kind", [(row[0], row[1]) for row in config.OPTIONS])
def test_every_bad_value_in_a_file_is_one_line(here, capsys, name, kind):
    written, _ = bad_for(kind)
    (here / "fugue.toml").write_text(f"{name} = {written}\n")
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert rc == 2
    assert err == f"fugue: fugue.toml: {name} = {written}: expected {config._describe(kind)}"


@pytest.mark.parametrize("name,kind", [(row[0], row[1]) for row in config.OPTIONS
                                       if row[0] not in ctlargs.NOT_FLAGS and bad_for(row[1])[1] is not None])
def test_every_bad_value_as_a_flag_is_one_line(here, capsys, name, kind):
    _, value = bad_for(kind)
    rc, _, err = check(capsys, f"{ctlargs.flag_of(name)}={value}")
    assert rc == 2
    assert err == f"fugue: {ctlargs.flag_of(name)} {value}: expected {config._describe(kind)}"


def test_every_option_has_a_flag_and_a_key():
    parser = ctlargs.build_parser()
    start = parser._subparsers._group_actions[0].choices["start"]
    flags = {opt for action in start._actions for opt in action.option_strings}
    for name in config.NAMES:
        if name not in ctlargs.NOT_FLAGS:
            assert ctlargs.flag_of(name) in flags, name
    for alias in ("--bind", "--user", "--group", "--chdir", "--daemon", "--foreground", "--pid-file",
                  "-c", "--config", "-w", "--workers", "--log-file", "--master-log-file", "--tmp-path",
                  "--ready-timeout", "--graceful-timeout", "--timeout", "--name", "--status-bind", "--app"):
        assert alias in flags, alias


def test_unknown_key_names_the_file_and_what_is_allowed(here, capsys):
    (here / "fugue.toml").write_text('wrokers = 2\n')
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert rc == 2
    assert err.startswith("fugue: fugue.toml: unknown key 'wrokers' (did you mean 'workers'?); allowed keys: "
                          "workers, bind, backlog")
    assert err.endswith(", app, script")
    (here / "fugue.toml").write_text('[server]\nworkers = 2\n')
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert rc == 2 and err.startswith("fugue: fugue.toml: unknown key 'server'; allowed keys: ")


@pytest.mark.parametrize("text,message", [
    ("workers = \n", "fugue: config file fugue.toml: not valid TOML: Invalid value (at line 1, column 11)"),
    ('app = "nocolon"\n', "fugue: fugue.toml: app = \"nocolon\": expected 'module:attr'"),
    ("script = []\n", "fugue: fugue.toml: script = []: expected a path, or a list of a path and its arguments"),
    ('app = "a:b"\nscript = "x.py"\n', "fugue: fugue.toml: give one of app, script or command, not several"),
    ('umask = "999"\n', 'fugue: fugue.toml: umask = "999": expected an octal umask such as 022'),
])
def test_bad_files(here, capsys, text, message):
    (here / "fugue.toml").write_text(text)
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert (rc, err) == (2, message)


def test_missing_and_unreadable_files(here, capsys):
    rc, _, err = check(capsys, "-c", "nope.toml")
    assert (rc, err) == (2, "fugue: config file nope.toml not found")
    (here / "dir.toml").mkdir()
    rc, _, err = check(capsys, "-c", "dir.toml")
    assert (rc, err) == (2, "fugue: config file dir.toml is a directory")


def test_flags_win_over_the_file_over_the_defaults(here):
    (here / "conf").mkdir()
    (here / "conf" / "fugue.toml").write_text(
        'workers = 3\nname = "file"\nbind = ["127.0.0.1:4000", "unix:app.sock"]\npid_file = "run.pid"\n'
        'umask = 0o027\nverbose = true\nscript = ["app.py", "--port", "1"]\n')
    args = ctlargs.build_parser().parse_args(["start", "-c", "conf/fugue.toml", "-w", "5", "--no-verbose",
                                          "--umask", "077", "--bind", ":5000", "--bind", "[::1]:5001"])
    options, target = ctlargs.gather_options(args)
    assert options["workers"] == 5                      # flag
    assert options["name"] == "file"                    # file
    assert options["verbose"] is False                  # flag: --no-verbose
    assert options["umask"] == 0o077                    # octal, as umask(1)
    assert options["bind"] == [":5000", "[::1]:5001"]   # flags replace the file's list
    assert options["pid_file"] == str(here / "conf" / "run.pid")  # relative to the file
    assert target == {"script": [str(here / "conf" / "app.py"), "--port", "1"]}
    cfg = config.build(options)
    assert cfg.graceful_timeout == config.DEFAULTS["graceful_timeout"]  # default
    args = ctlargs.build_parser().parse_args(["start", "-c", "conf/fugue.toml"])
    options, _ = ctlargs.gather_options(args)
    assert options["bind"] == ["127.0.0.1:4000", f"unix:{here / 'conf' / 'app.sock'}"]
    assert options["umask"] == 0o027 and options["verbose"] is True


def test_daemon_and_foreground_flags(here):
    parse = ctlargs.build_parser().parse_args
    assert ctlargs.gather_options(parse(["start", "--daemon", "x.py"]))[0]["daemonize"] is True
    assert ctlargs.gather_options(parse(["start", "--foreground", "x.py"]))[0]["daemonize"] is False
    (here / "fugue.toml").write_text("daemonize = true\n")
    assert ctlargs.gather_options(parse(["start", "-c", "fugue.toml", "--foreground", "x.py"]))[0]["daemonize"] is False
    opts = ctlargs.gather_options(parse(["start", "--user", "nobody", "--group", "0", "--chdir", "/", "x.py"]))[0]
    assert (opts["uid"], opts["gid"], opts["working_path"]) == ("nobody", 0, "/")


def test_targets_from_the_command_line(here):
    parser = ctlargs.build_parser()

    def target(*argv):
        argv = list(argv)
        tail = None
        if "--" in argv:
            i = argv.index("--")
            argv, tail = argv[:i], argv[i + 1:]
        args = parser.parse_args(["start", *argv])
        return ctlargs.choose_target(args, tail, {})

    assert target("-w", "2", "app.py", "-v", "x") == {"script": ["app.py", "-v", "x"]}
    assert target("app.py", "--", "--flag") == {"script": ["app.py", "--flag"]}
    assert target("--app", "pkg.mod:app") == {"app": "pkg.mod:app"}
    assert target("-w", "1", "--", "redis-server", "--port", "0") == {"command": ["redis-server", "--port", "0"]}
    with pytest.raises(ctl.ConfigError, match="give a script or --app, not both"):
        target("--app", "a:b", "app.py")


def test_check_says_ok_and_checks_the_app_imports(here, capsys):
    (here / "myapp.py").write_text("import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n    pass\n")
    (here / "fugue.toml").write_text('app = "myapp:H"\nworkers = 2\nbind = "127.0.0.1:4000"\n')
    rc, out, err = check(capsys, "-c", "fugue.toml")
    assert (rc, out) == (0, "ok: fugue.toml: app myapp:H; 2 workers; listening on 127.0.0.1:4000"), err
    # start would find nothing to listen on: check says so (it said ok)
    (here / "fugue.toml").write_text('app = "myapp:H"\n')
    rc, out, err = check(capsys, "-c", "fugue.toml")
    assert (rc, out, err) == (1, "", "fugue: nothing to listen on: give --bind (or bind in the config file)")
    rc, _, err = check(capsys, "-w", "1", "--", "sleep", "10")
    assert (rc, err) == (1, "fugue: nothing to listen on: give --bind (or bind in the config file)")
    (here / "fugue.toml").write_text('app = "myapp:Nope"\nbind = "127.0.0.1:4000"\n')
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert rc == 1
    assert err == "fugue: --app myapp:Nope: AttributeError: module 'myapp' has no attribute 'Nope'"
    (here / "fugue.toml").write_text('bind = "127.0.0.1:99999"\n')
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert (rc, err) == (1, "fugue: bad bind address '127.0.0.1:99999': port must be a number from 0 to 65535")
    rc, _, err = check(capsys, "--status-bind", "unix:/x.sock")
    assert (rc, err) == (1, "fugue: status_bind 'unix:/x.sock': give HOST:PORT (a TCP address)")
    rc, _, err = check(capsys, "--working-path", "nowhere")
    assert rc == 1 and err.startswith("fugue: working_path ") and err.endswith("nowhere does not exist or is not a directory")
    rc, _, err = check(capsys, "--user", "no-such-user-here")
    assert (rc, err) == (1, "fugue: unknown user 'no-such-user-here'")


@pytest.mark.parametrize("flag", ["--working-path", "--tmp-path", "--log-file", "--access-log"])
def test_a_path_with_a_newline_is_still_one_line(here, capsys, flag):
    # hypothesis found `--working-path=\n`: the refusal printed the newline raw, two lines
    rc, out, err = check(capsys, f"{flag}=nowhere\n/x")
    assert rc in (1, 2) and "\n" not in err and "nowhere\\n/x" in err, err


@pytest.mark.parametrize("path", ["nopath", "/a b", "/caf\u20ac", "/x\ty"])
def test_a_warmup_path_must_be_a_request_target(here, capsys, path):
    # '/caf€' made every worker fail with a UnicodeEncodeError traceback in the log
    rc, _, err = check(capsys, "--warmup", "/ok", "--warmup", path)
    assert rc == 2 and err.startswith("fugue: --warmup ") and "expected request paths such as /health" in err, err
    (here / "fugue.toml").write_text(f"warmup = {json.dumps(['/ok', path])}\n")
    rc, _, err = check(capsys, "-c", "fugue.toml")
    assert rc == 2 and err.startswith("fugue: fugue.toml: warmup = ") and "expected request paths" in err, err
    assert config.build({"warmup": ["/health", "/q?x=%E2%82%AC&y=*"]}).warmup == ["/health", "/q?x=%E2%82%AC&y=*"]


def test_check_refuses_what_watch_mode_would(here, capsys, monkeypatch):
    (here / "app.py").write_text("")
    rc, _, err = check(capsys, "--watch", "--watch-paths", "nope", "--bind", "127.0.0.1:0", "app.py")
    assert (rc, err) == (1, f"fugue: cannot watch {here}/nope: no such file or directory")
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # makes the import fail
    rc, _, err = check(capsys, "--watch", "--bind", "127.0.0.1:0", "app.py")
    assert (rc, err) == (1, "fugue: watch mode needs watchfiles: pip install watchfiles")
