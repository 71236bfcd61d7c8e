"""A clean Debian 12 system booted with systemd-nspawn: packaging/rootfs's tree, unpacked afresh.

Unlike tests/system/'s container (the host's own /usr), nothing of the host is
inside: only what mmdebstrap installed (systemd, dbus, python3) and what a
test installs with apt. The network is the host's, so the test database and
the fake provider on 127.0.0.1 are reachable, as a server reaches its database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.system.nspawn import Container

ROOT = Path(__file__).parents[2]


def unavailable() -> str | None:
    """Why a clean Debian 12 cannot be built and booted here, or None."""
    if os.geteuid() != 0:
        return "mmdebstrap and systemd-nspawn need root"
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package})"
    return None


def rootfs(kind: str) -> Path:
    """The cached minimal Debian 12 tarball (packaging/rootfs builds it on a miss)."""
    out = subprocess.run(
        [ROOT / "packaging" / "rootfs", kind],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"packaging/rootfs {kind} failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


class CleanSystem(Container):
    """Container's helpers (run, write, show, journal) on a tree of its own."""

    def __init__(self, name: str, log: Path, tree: Path) -> None:
        self.tree = tree
        super().__init__(name, log)
        self.binds = []  # none of the host's Python: the package brings its own

    def _python(self) -> str:
        return "/usr/bin/python3"

    def _tree(self) -> list[str]:
        return [f"--directory={self.tree}"]

    def _kernel_arguments(self) -> list[str]:
        return []  # its default target: a whole, if minimal, system

    def _after_boot(self) -> None:
        return  # D-Bus is there (mmdebstrap installed it)

    def boot(self, timeout: float = 90.0) -> None:
        super().boot(timeout)


@contextlib.contextmanager
def booted(name: str, work: Path) -> Iterator[CleanSystem]:
    """A fresh copy of the cached tree under *work*, booted; gone afterwards."""
    tarball = rootfs("boot")
    tree = work / "root"
    tree.mkdir()
    subprocess.run(["tar", "-xf", tarball, "-C", tree], check=True)
    box = CleanSystem(name, work / "console", tree)
    try:
        box.boot()
        yield box
    finally:
        box.shutdown()
        shutil.rmtree(tree, ignore_errors=True)
