"""Every shell script the image or CI runs passes shellcheck, with no exclusions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, run

SCRIPT_DIRS = ["systemd/rootfs/usr/libexec/sdagent", "packer/provisioners", "ci"]


def shell_scripts() -> list[Path]:
    scripts = []
    for directory in SCRIPT_DIRS:
        for path in sorted((REPO / directory).iterdir()):
            if path.is_file() and path.read_text(errors="replace").startswith(
                ("#!/usr/bin/env bash", "#!/bin/bash", "#!/bin/sh")
            ):
                scripts.append(path)
    return scripts


def test_there_are_scripts_to_check():
    names = {path.name for path in shell_scripts()}
    assert {"prepare-nvme", "webui", "validate.sh", "install-packaging-tools.sh"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda path: str(path.relative_to(REPO)))
def test_script_passes_shellcheck(shellcheck, script):
    result = run([shellcheck, "--norc", "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda path: str(path.relative_to(REPO)))
def test_script_is_strict_and_executable(script):
    assert "set -euo pipefail" in script.read_text(), f"{script.name} is not in strict mode"
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
