"""A real systemd, booted in a container, for the tests that drive fugue's shipped units.

The recipe (issue 14): a tmpfs holding an overlayfs whose lower dir is this machine's `/`
(so the container runs the very same systemd 252, Python and libraries), a fresh
/etc/machine-id, the units that would only get in the way masked (gettys, timesyncd, the
database and web servers this image carries, the timers), fugue copied into the overlay
and made importable by a venv there (`/usr/local/bin/fuguectl` is its entry point, where
the shipped unit expects it), then

    systemd-nspawn -D OVERLAY --register=no --keep-unit --private-network -M NAME -b

(without --keep-unit nspawn fails with "Failed to open system bus"), reached with
`nsenter -t <its init pid> -a ...`. Boot takes a few seconds; a test module boots one
Box and shares it (see tests/test_systemd.py).

Box.close() undoes everything boot() did, in reverse, whatever state boot() reached:
it powers the container off (SIGKILL after a deadline), kills what is left of its
process tree, unmounts the overlay and the tmpfs (lazily if still busy) and removes the
directory. `why_not()` says in one line why this machine cannot boot it, or None.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NSPAWN = shutil.which("systemd-nspawn") or "/usr/bin/systemd-nspawn"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"

# Units of this image that would start in the container and have nothing to do with
# fugue: they cost boot time and CPU, and a database must not run twice on one disk.
MASKED = ["getty@tty1.service", "console-getty.service", "container-getty@.service",
          "serial-getty@.service", "systemd-timesyncd.service", "postgresql.service",
          "postgresql@.service", "mysql.service", "mariadb.service", "redis-server.service",
          "haproxy.service", "nginx.service", "apache2.service", "e2scrub_reap.service",
          "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer",
          "fstrim.timer", "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer"]

VENV = "/opt/fugue-venv"
SRC = "/opt/fugue"


def why_not():
    """One line saying why this machine cannot boot the box, or None if it can."""
    if os.geteuid() != 0:
        return "booting systemd in a container needs root"
    if not os.access(NSPAWN, os.X_OK):
        return "systemd-nspawn is not installed (apt-get install systemd-container)"
    if not os.access(NSENTER, os.X_OK):
        return "nsenter is not installed (util-linux)"
    if not shutil.which("curl"):
        return "curl is not installed (the client inside the container)"
    if not os.path.exists("/usr/lib/systemd/systemd"):
        return "no systemd on this machine (/usr/lib/systemd/systemd) to boot in the container"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "the kernel has no overlayfs"
    except OSError:
        return "cannot read /proc/filesystems"
    return None


class BootFailed(Exception):
    """The box did not boot. `machine_cannot`: this machine cannot (no mount rights), as
    opposed to a boot that should have worked and did not (a failure to report)."""

    def __init__(self, text, machine_cannot=False):
        super().__init__(text)
        self.machine_cannot = machine_cannot


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


class Box:
    """One booted systemd container. Paths given to its methods are paths inside it."""

    def __init__(self, name=None):
        self.name = name or f"fugue-sd-{uuid.uuid4().hex[:8]}"
        self.base = None
        self.merged = None
        self.mounts = []
        self.nspawn = None
        self.init_pid = None
        self.console = None
        self.python = os.path.realpath(sys.executable)

    # -- life ---------------------------------------------------------------------------------

    def boot(self, timeout=90.0):
        self.base = tempfile.mkdtemp(prefix=self.name + "-")
        self._mount(["-t", "tmpfs", "-o", "mode=0755", "tmpfs", self.base])
        for d in ("upper", "work", "merged"):
            os.mkdir(os.path.join(self.base, d))
        self.merged = os.path.join(self.base, "merged")
        self._mount(["-t", "overlay", "overlay", "-o",
                     f"lowerdir=/,upperdir={self.base}/upper,workdir={self.base}/work", self.merged])
        self._prepare()
        self.console = open(os.path.join(self.base, "console.log"), "wb")
        self.nspawn = subprocess.Popen(
            [NSPAWN, "-D", self.merged, "--register=no", "--keep-unit", "--private-network",
             "-M", self.name, "-b"],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
            start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "dumb"})
        deadline = time.monotonic() + timeout
        while self.init_pid is None:
            if self.nspawn.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited {self.nspawn.returncode}: {self.console_tail()}")
            for child in _children(self.nspawn.pid):
                try:
                    with open(f"/proc/{child}/comm") as f:
                        if f.read().strip() == "systemd":
                            self.init_pid = child
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BootFailed(f"no init process after {timeout:g}s: {self.console_tail()}")
            time.sleep(0.05)
        # Until systemd has opened its private bus, systemctl answers nothing at all.
        state = ""
        while state not in ("running", "degraded"):
            left = deadline - time.monotonic()
            if left <= 0 or self.nspawn.poll() is not None:
                raise BootFailed(f"system state {state!r} after {timeout:g}s: {self.console_tail()}")
            r = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
            state = r.stdout.strip()
            if not state:
                time.sleep(0.1)
        return self

    def _mount(self, args):
        done = subprocess.run(["mount"] + args, capture_output=True, text=True)
        if done.returncode != 0:
            raise BootFailed(f"cannot mount {args[-1]} here: {done.stderr.strip()}", machine_cannot=True)
        self.mounts.append(args[-1])

    def _prepare(self):
        """The overlay's own machine id, masked units, fugue importable in a venv."""
        m = self.merged
        os.unlink(os.path.join(m, "etc/machine-id")) if os.path.lexists(os.path.join(m, "etc/machine-id")) else None
        with open(os.path.join(m, "etc/machine-id"), "w") as f:
            f.write(uuid.uuid4().hex + "\n")
        units = os.path.join(m, "etc/systemd/system")
        for unit in MASKED:
            path = os.path.join(units, unit)
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink("/dev/null", path)
        # Wanted-by links of masked units are harmless; the ones a unit of the host's
        # own /etc enabled and this image lacks are cleaned by nothing: drop them.
        # The unit runs fugue as www-data: this machine's Python lives under /root (0700 here).
        # Opening /root in the overlay changes nothing outside the container.
        os.chmod(os.path.join(m, "root"), 0o755)
        self.install_fugue()
        subprocess.run(["chroot", m, self.python, "-m", "venv", "--without-pip", "--system-site-packages", VENV],
                       check=True, capture_output=True)
        site = subprocess.run(["chroot", m, VENV + "/bin/python3", "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        self.write(os.path.join(site, "fugue-src.pth"), SRC + "\n")
        self.write("/usr/local/bin/fuguectl",
                   f"#!{VENV}/bin/python3\nimport sys\nfrom fugue.ctl import main\nsys.exit(main())\n", 0o755)

    def install_fugue(self):
        """Copy this checkout's fugue, test apps and load generator to /opt/fugue in the box."""
        dst = self.host_path(SRC)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(os.path.join(ROOT, "fugue"), os.path.join(dst, "fugue"), ignore=ignore)
        shutil.copytree(os.path.join(ROOT, "tests", "apps"), os.path.join(dst, "apps"), ignore=ignore)
        os.makedirs(os.path.join(dst, "bench"))
        shutil.copy(os.path.join(ROOT, "bench", "loadgen.py"), os.path.join(dst, "bench", "loadgen.py"))
        shutil.copytree(os.path.join(ROOT, "contrib"), os.path.join(dst, "contrib"))

    def close(self):
        """Power off and remove everything boot() made; safe to call at any stage, twice."""
        if self.nspawn is not None:
            if self.nspawn.poll() is None:
                # nspawn turns TERM into an orderly poweroff of the container's systemd.
                try:
                    os.kill(self.nspawn.pid, signal.SIGTERM)
                    self.nspawn.wait(20)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    pass
            for pid in reversed(_tree(self.nspawn.pid) + ([self.init_pid] if self.init_pid else [])):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.nspawn.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.nspawn = None
        if self.console is not None:
            self.console.close()
            self.console = None
        while self.mounts:
            target = self.mounts.pop()
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def console_tail(self, n=2000):
        try:
            with open(os.path.join(self.base, "console.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except (OSError, TypeError):
            return ""

    # -- inside -------------------------------------------------------------------------------

    def host_path(self, inside):
        return os.path.join(self.merged, inside.lstrip("/"))

    def write(self, inside, text, mode=0o644):
        path = self.host_path(inside)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    def argv(self, argv):
        return [NSENTER, "-t", str(self.init_pid), "-a", "--"] + list(argv)

    def env(self, extra=None):
        env = {"PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "HOME": "/root"}
        env.update(extra or {})
        return env

    def run(self, argv, timeout=60.0, check=False, env=None, input=None):
        """Run a command inside; a CompletedProcess with text stdout/stderr."""
        proc = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout,
                              env=self.env(env), input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def popen(self, argv, env=None, **kw):
        return subprocess.Popen(self.argv(argv), env=self.env(env), **kw)

    def sh(self, script, **kw):
        return self.run(["sh", "-c", script], **kw)

    def systemctl(self, *args, timeout=60.0):
        return self.run(["systemctl", "--no-pager"] + list(args), timeout=timeout)

    def show(self, unit, prop):
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal(self, unit, *args):
        return self.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit] + list(args)).stdout

    def alive(self, pid):
        """True if `pid` (a pid inside the box) is a live process there."""
        return self.run(["sh", "-c", f"test -d /proc/{int(pid)} && ! grep -q '^State:.*Z' /proc/{int(pid)}/status"]
                        ).returncode == 0
