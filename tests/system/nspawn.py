"""A real systemd (the host's own, in a systemd-nspawn container) for the unit's tests.

The container boots the host's tree with ``--volatile=yes``: a tmpfs root,
the host's ``/usr`` read-only, the host's network (so a Postgres and a fake
provider on 127.0.0.1 are reachable from inside). It boots to ``sysinit.target``
(journald, no sockets.target) so that services and sockets the host has enabled
(databases, brokers) do not start in it and take ports on the shared network.

This Python, its packages and this checkout are bound read-only under /opt,
because the unit's ``ProtectHome=yes`` hides /root and /home from the
service (a pyenv interpreter lives in /root), and a venv is made inside the
container from them, as an operator would make one under /opt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import order_monitor

PYTHON_MOUNT = "/opt/om-python"
DEPS_MOUNT = "/opt/om-deps"
SOURCE_MOUNT = "/opt/om-src"
VENV = "/opt/order-monitor/venv"


def unavailable() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install systemd-container)"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "no systemd in /usr/lib/systemd to boot"
    return None


def _visible(path: str) -> bool:
    """Whether *path* is inside the container as it is on the host (only /usr is)."""
    return path == "/usr" or path.startswith("/usr/")


class Container:
    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.binds: list[str] = []
        self.python = self._python()
        self._process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def _python(self) -> str:
        """The interpreter's path inside the container; adds the binds it needs."""
        base = str(Path(sys.base_prefix).resolve())
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        if _visible(base):
            root = base
        else:
            self.binds.append(f"--bind-ro={base}:{PYTHON_MOUNT}")
            root = PYTHON_MOUNT
        paths = sysconfig.get_paths()
        for i, site in enumerate(dict.fromkeys([paths["purelib"], paths["platlib"]])):
            if not _visible(site):
                self.binds.append(f"--bind-ro={site}:{DEPS_MOUNT}/{i}")
        self.binds.append(f"--bind-ro={Path(order_monitor.__file__).parents[1]}:{SOURCE_MOUNT}")
        return f"{root}/bin/{version}"

    def _tree(self) -> list[str]:
        """The container's root: the host's tree on a tmpfs, its /usr read-only."""
        return ["--directory=/", "--volatile=yes"]

    def _kernel_arguments(self) -> list[str]:
        # sysinit.target: none of the host's enabled services or sockets.
        return ["systemd.unit=sysinit.target"]

    def _after_boot(self) -> None:
        # sysinit.target has no D-Bus; systemd-run and systemd-analyze need it.
        self.run("systemctl", "start", "dbus.socket")

    def boot(self, timeout: float = 60.0) -> None:
        command = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            *self._tree(),
            f"--machine={self.name}",
            "--console=passive",
            *self.binds,
            "--boot",
            "--",
            "systemd.firstboot=off",
            *self._kernel_arguments(),
        ]
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.pid:
            self._check_alive()
            self.pid = self._find_init()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no init in the container after {timeout}s; see {self.log}")
            time.sleep(0.1)
        while True:
            self._check_alive()
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            )
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {state.stdout} {state.stderr}")
            time.sleep(0.2)  # PID 1 has not opened its control socket yet
        self._after_boot()

    def _check_alive(self) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited with {self._process.returncode}: "
                + self.log.read_text(errors="replace")[-2000:]
            )

    def _find_init(self) -> int:
        """The container's PID 1 as the host sees it: a descendant of nspawn named systemd."""
        assert self._process is not None
        todo = [self._process.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    for child in (task / "children").read_text().split():
                        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                            return int(child)
                        todo.append(int(child))
        return 0

    def run(
        self,
        *argv: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside the container (all its namespaces, its root)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "-",
            path,
            mode,
            input=text,
        )

    def make_venv(self) -> str:
        """A venv under /opt from the bound interpreter, packages and source; its script."""
        if self.python.startswith(PYTHON_MOUNT):
            # A shared-library build finds libpython by an absolute RUNPATH
            # into its original prefix; tell the loader where it is now.
            # (The volatile /etc may have no ld.so.conf to include conf.d.)
            self.write("/etc/ld.so.conf.d/om-python.conf", f"{PYTHON_MOUNT}/lib\n")
            self.run(
                "sh",
                "-c",
                "grep -qs ld.so.conf.d /etc/ld.so.conf || "
                "echo 'include /etc/ld.so.conf.d/*.conf' >> /etc/ld.so.conf; ldconfig",
            )
        self.run(self.python, "-m", "venv", "--without-pip", VENV)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        deps = [b.split(":")[-1] for b in self.binds if f":{DEPS_MOUNT}/" in b]
        # The checkout first, so it wins over any installed order_monitor.
        self.write(
            f"{VENV}/lib/{version}/site-packages/order-monitor.pth",
            "\n".join([SOURCE_MOUNT, *deps]) + "\n",
        )
        script = f"{VENV}/bin/order-monitor"
        # What pip would write for the console script.
        self.write(
            script,
            f"#!{VENV}/bin/python\nimport sys\nfrom order_monitor.cli import main\n"
            "sys.exit(main())\n",
            mode="0755",
        )
        return script

    # --- systemd ---------------------------------------------------------------------

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str, after: int | None = None) -> list[dict[str, Any]]:
        """Journal entries as journalctl's JSON objects (oldest first), newer than *after*.

        Not --after-cursor: with matches (-u, -p) systemd 252's journalctl skips
        the first matching entry after the cursor.
        """
        extra = [f"--since=@{after // 1_000_000}"] if after else []
        out = self.run("journalctl", "--no-pager", "-o", "json", *extra, *args, check=False).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [e for e in entries if after is None or int(e["__REALTIME_TIMESTAMP"]) > after]

    def cursor(self) -> int:
        """Where the journal ends now (its last entry's time, µs): entries after it are news."""
        out = self.run("journalctl", "--no-pager", "-o", "json", "-n", "1").stdout
        return int(json.loads(out.splitlines()[-1])["__REALTIME_TIMESTAMP"])

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        # nspawn turns SIGTERM into a clean poweroff of the container.
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)


@contextlib.contextmanager
def booted(name: str, log: Path) -> Iterator[Container]:
    container = Container(name, log)
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()


def message(entry: dict[str, Any]) -> str:
    """MESSAGE as text (journalctl gives a list of bytes when it is not UTF-8)."""
    raw = entry.get("MESSAGE", "")
    return bytes(raw).decode(errors="replace") if isinstance(raw, list) else str(raw)
