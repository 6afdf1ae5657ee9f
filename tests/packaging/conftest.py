"""Helpers for the tests that run the real packaging tools.

Each tool is looked up once; a missing tool FAILS the test that needs it, naming the install script,
so that a CI run without the tools cannot pass by skipping (ci/install-packaging-tools.sh installs
them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTFS = REPO / "systemd" / "rootfs"
INSTALL_HINT = "run ci/install-packaging-tools.sh (it installs systemd, shellcheck, cfn-lint and packer)"


def tools_dir() -> Path:
    """Where ci/install-packaging-tools.sh caches packer and its plugins."""
    configured = os.environ.get("SDAGENT_PACKAGING_TOOLS")
    return Path(configured) if configured else Path.home() / ".cache" / "sdagent" / "packaging-tools"


def require_tool(name: str, *candidates: Path) -> str:
    """The tool's path, or fail the test with how to install it."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing text output; never raises on a non-zero exit."""
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=300, **kwargs)


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return require_tool("systemd-analyze")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return require_tool("shellcheck")


@pytest.fixture(scope="session")
def cfn_lint() -> list[str]:
    """cfn-lint from this interpreter's environment (the project's venv)."""
    script = Path(sys.executable).parent / "cfn-lint"
    if not script.is_file():
        pytest.fail(f"cfn-lint is not installed in {sys.prefix}: {INSTALL_HINT}", pytrace=False)
    return [str(script)]


@pytest.fixture(scope="session")
def packer() -> str:
    return require_tool("packer", tools_dir() / "bin" / "packer")


@pytest.fixture(scope="session")
def packer_env() -> dict[str, str]:
    """The environment packer runs in: the cached plugins, no calls home."""
    return {**os.environ, "PACKER_PLUGIN_PATH": str(tools_dir() / "plugins"), "CHECKPOINT_DISABLE": "1"}
