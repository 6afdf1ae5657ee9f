"""What the differential tests compare: the shape of an answer, and where two shapes differ.

A shape is the answer's type tree: dicts by key, a list by the shapes of its items, leaves by
type name (``int`` and ``float`` apart: a client that parses one may not take the other).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.conformance.conftest import LAUNCHER, launcher_env


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:  # the distinct shapes of the items, in order
            if shape(item) not in shapes:
                shapes.append(shape(item))
        return shapes
    return type(value).__name__


def differences(real: Any, simulated: Any, path: str = "$") -> list[str]:
    """Where the simulator's shape departs from the real one, one line per place."""
    if isinstance(real, dict) and isinstance(simulated, dict):
        found = [f"{path}.{key}: only the real server has it" for key in real if key not in simulated]
        found += [f"{path}.{key}: only the simulator has it" for key in simulated if key not in real]
        for key in real.keys() & simulated.keys():
            found += differences(real[key], simulated[key], f"{path}.{key}")
        return found
    if isinstance(real, list) and isinstance(simulated, list):
        if len(real) == len(simulated) == 1:
            return differences(real[0], simulated[0], f"{path}[]")
        return [] if real == simulated else [f"{path}: items {real} (real) vs {simulated} (simulator)"]
    return [] if real == simulated else [f"{path}: {real} (real) vs {simulated} (simulator)"]


def assert_same_shape(real: Any, simulated: Any) -> None:
    found = differences(shape(real), shape(simulated))
    assert not found, "\n".join(found)


def both(servers: dict[str, str], method: str, path: str, **kwargs: Any) -> dict[str, httpx.Response]:
    """The same request to each server (``{"real": url, "sim": url}``), answers by name."""
    return {name: httpx.request(method, url + path, timeout=120, **kwargs) for name, url in servers.items()}


def answer(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


@contextlib.contextmanager
def launched(
    webui: str, root: Path, workdir: Path, port: int, ready_path: str, timeout_s: float,
    command: list[str] | None = None,
) -> Iterator[str]:  # fmt: skip
    """The real WebUI started alone, by the shipped launcher or ``command`` (run in its tree);
    yields its URL once ``ready_path`` answers."""
    log = (workdir / f"{webui}.log").open("wb")
    env = {**os.environ, **launcher_env(webui, root, workdir, port)}
    process = subprocess.Popen(command or ["bash", str(LAUNCHER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=root / webui, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(url + ready_path):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / f"{webui}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{webui} did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
