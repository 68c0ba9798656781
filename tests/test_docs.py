"""README stays true to the code: every option and every fuguectl command is in it."""

import os
import re

from fugue.config import OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_every_option_is_in_the_readme_table():
    text = readme()
    for name, _, _, _ in OPTIONS:
        assert re.search(rf"^\| `{name}` \|", text, re.M), f"option {name} missing from README"


def test_the_readme_table_says_what_config_options_says():
    """Each row: the kind, the default and the help of config.OPTIONS (the help may go on)."""
    import json

    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| `(\w+)` \| (.*?) \| (.*?) \| (.*) \|$",
                                                            readme(), re.M)}
    for name, kind, default, text in OPTIONS:
        shown_kind = " / ".join(kind[len("choice:"):].split("|")) if kind.startswith("choice:") else kind
        shown_default = ("" if default in (None, []) else f"`{default:#05o}`" if name == "umask"
                         else f"`{default!r}`" if isinstance(default, bool) else f"`{json.dumps(default)}`")
        row_kind, row_default, row_text = rows[name]
        assert (row_kind, row_default) == (shown_kind, shown_default), name
        assert row_text.startswith(text), f"{name}: README says {row_text!r}, config.OPTIONS {text!r}"


def test_every_fuguectl_command_is_in_the_readme():
    from fugue.control import COMMANDS

    text = readme()
    for cmd in COMMANDS:
        assert f"fuguectl {cmd}" in text, f"fuguectl {cmd} missing from README"


def test_readme_set_up_commands_match_ci():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    test_command = "pip install -e '.[test]' && python3 -m pytest"
    assert test_command in readme() and test_command in ci


def test_every_router_option_is_in_the_readme_and_fugue5():
    from fugue.apps import ROUTER_OPTIONS

    with open(os.path.join(ROOT, "man", "fugue.5")) as f:
        page = f.read().replace("\\-", "-")
    for name, _, _, _ in ROUTER_OPTIONS:
        assert f"`{name}`" in readme() or f"{name} = " in readme(), f"router option {name} missing from README"
        assert f"\\fB{name}\\fR = " in page, f"router option {name} missing from fugue(5)"
