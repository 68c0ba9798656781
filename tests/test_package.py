"""The package is complete: `python -m build` and `pip wheel .` work from a clean copy of the
tree, the sdist carries LICENSE, pyproject.toml, contrib/, examples/ and the man pages, and the
wheel (built from that sdist, so nothing is missing from it) installs every file of contrib/ and
examples/ under share/fugue/ and the man pages under share/man/."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = shutil.ignore_patterns(".git", "tmp", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "*.sqlite3", "out", "fugue.pid")


def shipped_files():
    """Every file of contrib/ and examples/ as it must appear under share/fugue/."""
    out = []
    for top in ("contrib", "examples"):
        for root, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith((".pyc", ".sqlite3")):
                    continue
                out.append(os.path.relpath(os.path.join(root, name), ROOT))
    return sorted(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pytest.importorskip("build", reason="pip install build (the test extra)")
    src = tmp_path_factory.mktemp("pkg") / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    return src


def run(argv, cwd):
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_python_m_build_makes_a_complete_sdist_and_wheel(source, tmp_path):
    # --no-isolation: the build requirements (setuptools, wheel) are the test extra's; an isolated
    # build would download them again for every run.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(source)], tmp_path)
    sdist = next(p for p in os.listdir(tmp_path) if p.endswith(".tar.gz"))
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    with tarfile.open(tmp_path / sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames()}
    for must in ["LICENSE", "pyproject.toml", "setup.cfg", "README.md", "man/fuguectl.1", "man/fugue.5",
                 "man/fugue.7", "fugue/ctl.py"] + shipped_files():
        assert must in names, f"{must} missing from the sdist"
    check_wheel(tmp_path / wheel)


def test_pip_wheel_builds_the_same_wheel(source, tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)], tmp_path)
    check_wheel(tmp_path / next(p for p in os.listdir(tmp_path) if p.endswith(".whl")))


def check_wheel(path):
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    for page in ("share/man/man1/fuguectl.1", "share/man/man5/fugue.5", "share/man/man7/fugue.7"):
        assert page in data, f"{page} missing from the wheel"
    for rel in shipped_files():
        assert f"share/fugue/{rel}" in data, f"{rel} is not installed (add it to setup.cfg's data_files)"
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names), names
    assert "fugue/ctl.py" in names


def test_readme_set_up_in_a_venv_of_debians_python(tmp_path):
    """README's `python3 -m venv .venv && . .venv/bin/activate` then `pip install .`, with Debian's
    own python3 (which refuses `pip install` outside a venv): fuguectl runs and the man pages,
    contrib/ and examples/ land under .venv/share/ as README says."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("needs Debian's /usr/bin/python3")
    if subprocess.run([python, "-c", "import ensurepip"], capture_output=True).returncode:
        pytest.skip("python3-venv is not installed (apt-get install python3-venv)")
    venv = tmp_path / ".venv"
    run([python, "-m", "venv", str(venv)], tmp_path)
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(ROOT, src, ignore=SKIP)
    # Offline: the wheel is built by this interpreter (a fresh venv has no `wheel` for a build
    # without isolation) and installed without its dependencies (their installation is pip's business).
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(src)], tmp_path)
    wheel = next(wheels.glob("*.whl"))
    run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], tmp_path)
    done = subprocess.run([str(venv / "bin" / "fuguectl"), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("fuguectl (fugue) "), done
    for rel in ["share/man/man1/fuguectl.1", "share/fugue/contrib/systemd/fugue@.service",
                "share/fugue/examples/hello.py", "share/fugue/examples/django/mysite/settings.py"]:
        assert (venv / rel).is_file(), rel
