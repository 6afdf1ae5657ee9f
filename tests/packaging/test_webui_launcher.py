"""The WebUI launcher run for real with a stub interpreter that records its arguments: what the
shipped unit starts must listen on loopback only (A1111 binds every interface without
``--server-name``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOTFS

SCRIPT = ROOTFS / "usr/libexec/sdagent/webui"
STUB = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGV_LOG"\n'


def launch(tmp_path: Path, webui: str, **env_vars: str) -> list[str]:
    python = tmp_path / "webuis" / webui / "venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB)
    python.chmod(0o755)
    log = tmp_path / "argv"
    env = {**os.environ, "SDAGENT_WEBUI": webui, "SDAGENT_WEBUI_PORT": "7861", "ARGV_LOG": str(log),
           "SDAGENT_WEBUI_ROOT": str(tmp_path / "webuis"), "STATE_DIRECTORY": str(tmp_path / "state"), **env_vars}  # fmt: skip
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, timeout=30)
    return log.read_text().splitlines()


def value_of(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("webui, flag", [("a1111", "--server-name"), ("comfyui", "--listen")])
def test_the_webui_listens_on_loopback_only(tmp_path, webui, flag) -> None:
    argv = launch(tmp_path, webui)
    assert value_of(argv, flag) == "127.0.0.1"
    assert value_of(argv, "--port") == "7861"


@pytest.mark.parametrize("webui", ["a1111", "comfyui"])
def test_extra_flags_from_the_environment_come_last(tmp_path, webui) -> None:
    argv = launch(tmp_path, webui, SDAGENT_WEBUI_ARGS="--use-cpu all  --no-half")
    assert argv[-3:] == ["--use-cpu", "all", "--no-half"]
    assert launch(tmp_path / "plain", webui)[-1] not in ("", "--no-half")  # none given: no empty argument


def test_comfyuis_folders_exist_on_a_fresh_state_directory(tmp_path) -> None:
    argv = launch(tmp_path, "comfyui")  # ComfyUI exits at once on a --user-directory that is missing
    for flag in ("--user-directory", "--input-directory", "--output-directory", "--temp-directory"):
        assert Path(value_of(argv, flag)).is_dir(), flag


def test_comfyuis_model_paths_file_can_be_moved(tmp_path) -> None:
    argv = launch(tmp_path, "comfyui", SDAGENT_COMFYUI_MODEL_PATHS="/srv/paths.yaml")
    assert value_of(argv, "--extra-model-paths-config") == "/srv/paths.yaml"


def test_an_unknown_webui_is_refused_by_name(tmp_path) -> None:
    env = {**os.environ, "SDAGENT_WEBUI": "forge2", "SDAGENT_WEBUI_PORT": "7861",
           "SDAGENT_WEBUI_ROOT": str(tmp_path)}  # fmt: skip
    (tmp_path / "forge2/venv/bin").mkdir(parents=True)
    (tmp_path / "forge2/venv/bin/python").write_text(STUB)
    (tmp_path / "forge2/venv/bin/python").chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "unknown SDAGENT_WEBUI 'forge2'" in done.stderr
