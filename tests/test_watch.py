"""fugue.watch: the relevance rules (pure, table-driven) and the watcher on real
files. Waits are select() on the watcher's fd with a deadline; "nothing
arrives" is a select() that times out."""

import math
import os
import select
import sys
import time

import pytest

from fugue.errors import FugueError
from fugue.watch import Watcher

pytestmark = pytest.mark.timeout(30)

QUIET = 1.0  # how long "no batch" is watched for


@pytest.fixture
def root(tmp_path):
    # watchfiles reports realpaths; compare with those.
    return os.path.realpath(tmp_path)


@pytest.fixture
def started():
    watchers = []

    def start(*args, **kwargs):
        w = Watcher(*args, **kwargs)
        watchers.append(w)
        w.start()
        return w

    yield start
    for w in watchers:
        w.stop()


def write(path, text="x = 1\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def next_batch(w, timeout=5.0):
    """The next posted batch, or fail at the deadline."""
    ready, _, _ = select.select([w], [], [], timeout)
    assert ready, f"no batch within {timeout} s"
    batch = w.take()
    assert batch, "fileno() was readable but take() returned nothing"
    return batch


def assert_no_batch(w, seconds=QUIET):
    ready, _, _ = select.select([w], [], [], seconds)
    assert not ready, f"unexpected batch: {w.take()}"
    assert w.take() == []


# -- relevance rules ---------------------------------------------------------

R = "/srv/app"

RELEVANCE = [
    # (include, exclude, ignore_paths, path, counts)
    (("*.py",), (), (), f"{R}/app.py", True),
    (("*.py",), (), (), f"{R}/pkg/sub/mod.py", True),
    (("*.py",), (), (), f"{R}/notes.txt", False),
    (("*.py",), (), (), f"{R}/__pycache__/app.py", False),
    (("*.py",), (), (), f"{R}/pkg/__pycache__/app.cpython-311.pyc", False),
    (("*.py",), (), (), f"{R}/.git/hooks/x.py", False),
    (("*.py",), (), (), f"{R}/.venv/lib/site.py", False),
    (("*.py",), (), (), f"{R}/node_modules/x.py", False),
    (("*.py",), (), (), f"{R}/.#app.py", False),  # emacs lock
    (("*",), (), (), f"{R}/.app.py.swp", False),
    (("*",), (), (), f"{R}/.app.py.swx", False),
    (("*",), (), (), f"{R}/app.py~", False),
    (("*",), (), (), f"{R}/#app.py#", False),
    (("*",), (), (), f"{R}/4913", False),
    (("*",), (), (), f"{R}/app.pyc", False),
    (("*",), (), (), f"{R}/access.log", False),
    (("*",), (), (), f"{R}/config.toml", True),
    (("*.py",), (), (f"{R}/tmp",), f"{R}/tmp/x.py", False),
    (("*.py",), (), (f"{R}/tmp",), f"{R}/tmpfoo.py", True),
    (("*",), (), (f"{R}/fugue.err",), f"{R}/fugue.err", False),
    (("*.py",), ("test_*",), (), f"{R}/test_app.py", False),
    (("*.py",), ("build",), (), f"{R}/build/lib/x.py", False),
    (("*.py",), ("migrations/*",), (), f"{R}/migrations/0001.py", False),
    (("*.py",), ("migrations/*",), (), f"{R}/app/migrations/0001.py", True),
    (("*.html",), (), (), f"{R}/templates/index.html", True),
    (("*.html",), (), (), f"{R}/app.py", False),
    (("templates/*.html",), (), (), f"{R}/templates/index.html", True),
    (("templates/*.html",), (), (), f"{R}/index.html", False),
    (("*.py",), (), (), R, False),  # the root itself
    (("*.py",), (), (), "/elsewhere/app.py", False),
]


@pytest.mark.parametrize("include, exclude, ignore_paths, path, counts", RELEVANCE)
def test_relevance(include, exclude, ignore_paths, path, counts):
    w = Watcher([R], include=include, exclude=exclude, ignore_paths=ignore_paths)
    w._dirs, w._files = [R], set()  # R need not exist: the rules are pure
    assert w.relevant(path) is counts


def test_relevance_of_a_single_watched_file():
    w = Watcher(["/srv/app/settings.toml"])
    w._dirs, w._files = [], {"/srv/app/settings.toml"}
    assert w.relevant("/srv/app/settings.toml")  # named explicitly: include does not apply
    assert not w.relevant("/srv/app/other.py")  # a sibling, seen through the directory


# -- the watcher on real files -------------------------------------------------

def test_one_edit_gives_one_batch_naming_the_file(root, started):
    path = os.path.join(root, "app.py")
    write(path)
    w = started([root])
    assert w.quiet_for() == math.inf
    write(path, "y = 2\n")
    assert next_batch(w) == [path]
    assert w.quiet_for() >= w.settle  # posted only after the tree settled
    assert_no_batch(w, 0.5)


def test_fifty_files_over_two_seconds_give_one_batch(root, started):
    # settle 0.5 rather than 0.3 so a loaded test machine pausing between two
    # writes does not split the burst.
    w = started([root], settle=0.5)
    paths = [os.path.join(root, "pkg", f"mod{i:02}.py") for i in range(50)]
    for path in paths:
        write(path)
        time.sleep(0.04)  # an rsync in progress, not synchronisation
    assert next_batch(w) == sorted(paths)
    assert_no_batch(w)


def test_ignored_changes_give_no_batch(root, started):
    ignored_dir = os.path.join(root, "tmp")
    os.makedirs(ignored_dir)
    w = started([root], ignore_paths=[ignored_dir, os.path.join(root, "fugue.log.py")])
    write(os.path.join(root, "pkg", "__pycache__", "mod.cpython-311.pyc"))
    write(os.path.join(root, "pkg", "__pycache__", "mod.py"))
    write(os.path.join(root, ".app.py.swp"))
    write(os.path.join(root, ".#app.py"))
    write(os.path.join(root, "access.log"))
    write(os.path.join(ignored_dir, "handoff.py"))
    write(os.path.join(root, "fugue.log.py"))
    write(os.path.join(root, "notes.txt"))
    assert_no_batch(w)
    # The watcher was alive all along, and none of the above was held back.
    path = os.path.join(root, "app.py")
    write(path)
    assert next_batch(w) == [path]


def test_pause_drops_changes_and_resume_watches_again(root, started):
    w = started([root])
    w.pause()
    write(os.path.join(root, "while_paused.py"))
    assert_no_batch(w)
    w.resume()
    path = os.path.join(root, "after_resume.py")
    write(path)
    assert next_batch(w) == [path]


def test_pause_discards_a_batch_not_yet_taken(root, started):
    w = started([root])
    write(os.path.join(root, "app.py"))
    select.select([w], [], [], 5.0)
    w.pause()
    assert select.select([w], [], [], 0)[0] == []
    assert w.take() == []


def test_custom_include(root, started):
    w = started([root], include=("*.html",))
    page = os.path.join(root, "templates", "index.html")
    write(os.path.join(root, "app.py"))
    write(page, "<p>hi</p>\n")
    assert next_batch(w) == [page]


def test_single_file_survives_an_editor_save_by_rename(root, started):
    path = os.path.join(root, "settings.toml")
    write(path, "a = 1\n")
    w = started([path])
    write(os.path.join(root, "sibling.toml"))
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("a = 2\n")
    os.rename(tmp, path)
    assert next_batch(w) == [path]
    write(path, "b = 3\n")  # a watch on the replaced inode would miss this
    assert next_batch(w) == [path]


def test_stop_is_idempotent_and_ends_the_thread(root):
    w = Watcher([root])
    w.stop()  # never started: nothing to do
    w = Watcher([root])
    w.start()
    thread = w._thread
    assert thread.is_alive()
    w.stop()
    w.stop()
    assert not thread.is_alive()
    assert w.fileno() == -1


def test_start_on_a_missing_path_is_one_line_error(root):
    w = Watcher([root, os.path.join(root, "nope")])
    with pytest.raises(FugueError) as info:
        w.start()
    assert "nope" in str(info.value) and "\n" not in str(info.value)


def test_start_without_watchfiles(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # makes the import fail
    with pytest.raises(FugueError, match=r"^watch mode needs watchfiles: pip install watchfiles$"):
        Watcher([root]).start()


def test_files_written_into_a_new_directory_at_once_are_seen(root, started):
    # inotify only watches a new directory after it has seen it created: a
    # file written straight into it (git checkout of a new package) would be
    # missed without the watcher's walk of new directories.
    w = started([root])
    path = os.path.join(root, "newpkg", "deep", "mod.py")
    write(path)
    write(os.path.join(root, "newpkg", "__pycache__", "mod.py"))
    write(os.path.join(root, "newpkg", "deep", "readme.txt"))
    assert next_batch(w) == [path]
