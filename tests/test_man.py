"""The man pages lint clean, render without warnings, and stay true to the code:
every option, flag, command and signal the code has is in them."""

import configparser
import os
import re
import shutil
import subprocess

import pytest

from fugue import config, control, ctl, ctlargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["man/fuguectl.1", "man/fugue.5", "man/fugue.7"]


def source(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def plain(page):
    """The page's text with roff escapes for dashes and fonts undone (no tool needed)."""
    text = source(page).replace("\\-", "-").replace("\\e", "\\")
    return re.sub(r"\\f[BIRP]", "", text)


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(page):
    if not shutil.which("mandoc"):
        pytest.skip("mandoc is not installed")
    done = subprocess.run(["mandoc", "-T", "lint", "-W", "all", page], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_groff_has_no_warnings(page):
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    done = subprocess.run(["groff", "-ww", "-z", "-man", page], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("width", ["80", "60"])
def test_man_renders_without_warnings(page, width):
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    env = dict(os.environ, MANWIDTH=width, MANPAGER="cat", PAGER="cat")
    done = subprocess.run(["man", "-l", page], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert len(done.stdout) > 1000


def test_every_option_is_a_key_in_fugue5():
    text = plain("man/fugue.5")
    for name in config.NAMES:
        assert re.search(rf"^{re.escape(name)} = ", text, re.M), name
    for key in ctlargs.TARGET_KEYS:
        assert re.search(rf"^{key} = ", text, re.M), key


def test_every_flag_and_command_is_in_fuguectl1():
    text = plain("man/fuguectl.1")
    parser = ctlargs.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(ctlargs.COMMANDS)
    for name, sub in commands.items():
        assert re.search(rf"^(\.B |\.BR )?{re.escape(name)}\b", text, re.M), f"command {name}"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{name} {flag}"
    for name in config.NAMES:
        if name not in ctlargs.NOT_FLAGS:
            assert ctlargs.flag_of(name) in text, name
            if config.KINDS[name] == "bool":
                assert "--no-" + ctlargs.flag_of(name)[2:] in text, name


def test_every_control_command_of_the_master_is_reachable_and_documented():
    text = plain("man/fuguectl.1")
    for cmd in control.COMMANDS:
        assert cmd in ctlargs.COMMANDS, cmd
        assert re.search(rf"^(\.B |\.BR |\.TP\n)?{re.escape(cmd)}\b", text, re.M), cmd


def test_signals_table_matches_the_master():
    from fugue.master import SIGNALS

    text = plain("man/fugue.7")
    section = text.split(".SH SIGNALS", 1)[1].split(".SH ", 1)[0]
    for sig in SIGNALS:
        name = sig.name[3:]
        if name == "CHLD":
            continue
        assert re.search(rf"\b{name}\b", section), name
    for concept in ("GENERATIONS", "ROLLBACK", "UPGRADE", "DRAINING", "MASTER", "WORKERS"):
        assert f".SH {concept}" in text or f".SH {concept} " in text, concept


def test_setup_installs_the_pages():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    installed = " ".join(cfg["options.data_files"].values())
    for page in PAGES:
        assert page in installed and os.path.exists(os.path.join(ROOT, page))


def test_the_synopsis_names_every_command():
    text = plain("man/fuguectl.1")
    synopsis = text.split(".SH SYNOPSIS", 1)[1].split(".SH ", 1)[0]
    words = set(re.findall(r"[\w-]+", synopsis))
    for cmd in ctlargs.COMMANDS:
        assert cmd in words, f"fuguectl {cmd} missing from the SYNOPSIS of fuguectl(1)"
