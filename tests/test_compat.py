"""gunicorn's and uvicorn's command line: README's "Coming from gunicorn" table is true. Every row's
first column parses with fuguectl start's parser and sets exactly the TOML key of the second column;
the aliases' edge cases are refused with one line."""

import os
import re
import shlex
import tomllib

import pytest

from fugue import ctlargs
from fugue.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table_rows():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Coming from gunicorn", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 20
    return [tuple(re.findall(r"`([^`]*)`", cell)[:1] or [""] for cell in row.strip("|").split(" | ")[:2])
            for row in rows]


def parse(argv, tmp_path):
    """(args, options, target) as `fuguectl start ARGV` computes them before starting anything."""
    parser = ctlargs.build_parser()
    args = parser.parse_args(["start"] + argv)
    if args.args and ctlargs.is_app_spec(args.target):
        ctlargs._parse_options_after_app(parser.fugue_start_parsers["start"], args)
    options, file_target = ctlargs.gather_options(args)
    ctlargs.environment(args)
    return args, options, ctlargs.choose_target(args, None, file_target)


@pytest.mark.parametrize("flags,fugue", table_rows(), ids=lambda v: v[0] if isinstance(v, list) else v)
def test_readme_row_parses_and_means_what_the_table_says(flags, fugue, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    (tmp_path / "fugue.toml").write_text("workers = 3\n")
    argv = shlex.split(flags[0])
    start = ctlargs.build_parser().fugue_start_parsers["start"]
    known = {s for action in start._actions for s in action.option_strings}
    for token in argv:
        if token.startswith("-") and token != "-":  # "-" is a value (stdout)
            assert token in known, f"{token} is not one of fuguectl start's flags"
    app_row = not argv[0].startswith("-")
    args, options, target = parse(argv if app_row else argv + ["app:app"], tmp_path)
    try:
        expected = tomllib.loads(fugue[0])
    except tomllib.TOMLDecodeError:
        return  # a flag-only row (-c, -e): parsing it is the check
    (key, value), = expected.items()
    if key == "app":
        assert target == {"app": value}
    else:
        assert options[key] == value, (flags, options)
        assert target == {"app": "app:app"}


def test_options_may_follow_the_app_as_in_gunicorn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, options, target = parse(["-b", ":8000", "myproj.wsgi:application", "-w", "4", "-b", ":8001",
                                "--threads", "2"], tmp_path)
    assert target == {"app": "myproj.wsgi:application"}
    assert (options["workers"], options["bind"], options["threads"]) == (4, [":8000", ":8001"], 2)


def test_a_script_still_takes_its_own_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "serve.py").write_text("")
    args, options, target = parse(["-w", "2", "serve.py", "-w", "9"], tmp_path)
    assert target == {"script": ["serve.py", "-w", "9"]} and options["workers"] == 2


@pytest.mark.parametrize("argv,error", [
    (["-k", "gevent", "app:app"], "-k gevent: no fugue adapter replaces this worker class; choose one of sync, "),
    (["-k", "sync", "--adapter", "asgi", "app:app"], "-k sync means --adapter wsgi, not --adapter asgi"),
    (["-c", "gunicorn.conf.py", "app:app"], "-c gunicorn.conf.py: fugue's config file is TOML"),
    (["app:create_app()"], "app:create_app(): fugue does not call app factories"),
    (["--app", "a:b", "c:d"], "give c:d or --app a:b, not both"),
    (["-e", "NOEQUALS", "app:app"], "-e 'NOEQUALS': expected KEY=VALUE"),
    (["-e", "1X=2", "app:app"], "-e '1X=2': expected KEY=VALUE"),
])
def test_borrowed_flags_refuse_what_they_cannot_mean(argv, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        parse(argv, tmp_path)
    assert str(e.value).startswith(error), str(e.value)


def test_env_reaches_the_workers(fugue_proc, workdir):
    (workdir / "envapp.py").write_text(
        "import os\n"
        "def app(environ, start_response):\n"
        "    body = os.environ.get('GREETING', 'unset').encode()\n"
        "    start_response('200 OK', [('Content-Length', str(len(body)))])\n"
        "    return [body]\n")
    p = fugue_proc(["fuguectl", "start", "-w", "1", "-b", "127.0.0.1:0", "-k", "sync", "-e", "GREETING=hi there",
                    "envapp:app"]).started()
    assert p.body() == "hi there"
