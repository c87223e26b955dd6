"""The deployment checks' external tools, installed once per session when missing.

``scripts/setup_deploy_tools.sh`` installs them (pip into this venv, apt for Prometheus); it
is idempotent, so calling it when everything is present costs a few milliseconds.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SETUP = ROOT / "scripts" / "setup_deploy_tools.sh"


@functools.cache
def _install() -> None:
    """Run the setup script once (its output shows in the failure message if it fails)."""
    result = subprocess.run(["bash", str(SETUP), str(VENV_BIN.parent)], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"{SETUP.name} failed:\n{result.stdout}{result.stderr}")


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{VENV_BIN}:/usr/bin:/usr/local/bin:/bin")


def tool(name: str) -> str:
    """Path of the executable ``name`` (venv first, then PATH), installing the tools if needed."""
    found = _which(name)
    if found is None:
        _install()
        found = _which(name)
    if found is None:
        raise RuntimeError(f"{name} not found after {SETUP.name}")
    return found
