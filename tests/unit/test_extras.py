"""`pip install sdagent` is the agent; the gateway and the simulator are extras."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sdagent.cli import main
from sdagent.errors import ExitCode

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
GATEWAY_ONLY = ("fastapi", "uvicorn", "sse_starlette", "limits")
SIM_ONLY = ("aiohttp", "av", "tomli_w")


def test_the_agent_runs_on_the_core_dependencies_alone():
    # Importing every module `sdagent run` uses loads none of the extras' libraries.
    extras = (*GATEWAY_ONLY, *SIM_ONLY)
    probe = (
        "import sys, sdagent.cli, sdagent.agent.build, sdagent.backends.simulated, sdagent.backends.a1111, "
        f"sdagent.backends.comfyui; print(','.join(m for m in {extras!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_the_core_dependencies_leave_the_extras_out():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for package in ("fastapi", "uvicorn", "sse-starlette", "limits"):
        assert package not in core and any(package in d for d in extras["gateway"])
    for package in ("aiohttp", "av>", "tomli-w"):
        assert package not in core and any(package in d for d in extras["sim"])


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [(["gateway"], "fastapi", "gateway"), (["sim"], "aiohttp", "sim"), (["devstack"], "tomli_w", "sim")],
)
def test_a_command_whose_extra_is_missing_names_the_extra(argv, blocked, extra, monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m.startswith(("sdagent.gateway.", "sdagent.sim.", "sdagent.devstack."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now fails as if not installed
    if argv == ["gateway"]:
        config = tmp_path / "sdagent.toml"
        config.write_text("")
        argv = ["gateway", "--config", str(config)]
    assert main(argv) == ExitCode.FAILURE
    assert f"pip install 'sdagent[{extra}]'" in capsys.readouterr().err
