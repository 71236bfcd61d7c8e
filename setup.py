"""Build hook: copy the deployment files (order_monitor/shipped.py lists them) into the package.

They stay where their owners keep them in the checkout (systemd/, monitoring/,
packaging/); the wheel gets copies under order_monitor/shipped/. Everything
else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


def _shipped() -> object:
    spec = importlib.util.spec_from_file_location("_shipped", HERE / "order_monitor" / "shipped.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout itself
        shipped = _shipped()
        target = Path(self.build_lib) / "order_monitor" / shipped.PACKAGE_DIR  # type: ignore[attr-defined]
        target.mkdir(parents=True, exist_ok=True)
        for name, relative in shipped.FILES.items():  # type: ignore[attr-defined]
            shutil.copyfile(HERE / relative, target / shipped.packaged_name(name))  # type: ignore[attr-defined]


setup(cmdclass={"build_py": BuildWithShippedFiles})
