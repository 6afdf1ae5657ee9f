"""amazon-ec2-metadata-mock (AEMM), the real IMDS mock from AWS, for integration tests and demos.

The binary is built once per machine with ``go install`` into a cache directory (Go 1.23+ and the
Go module proxy are needed the first time only). Each :class:`AemmServer` runs one mode of it on a
free loopback port with IMDSv2 required.

AEMM caveats that shape the helpers below (v1.13.0):
- ``spot`` serves ``spot/instance-action`` *and* ``events/recommendations/rebalance`` (the rebalance
  path is not served by ``events``); ``events`` serves only ``events/maintenance/scheduled``;
  ``asglifecycle`` answers ``InService`` until ``--asg-termination-delay-sec`` has passed since
  start, then ``Terminated`` (a delay of 0 means ``Terminated`` at once). Paths of other modes 404.
- Without ``-t`` the spot time is recomputed (request time + 2 min) on every request.
- It cannot do 429/503, hop limits or ``Warmed:*`` states: :mod:`sdagent.devstack.fake_imds` can.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from sdagent.devstack.kafka import die_with_parent, exclusive_lock, free_loopback_port
from sdagent.devstack.process import stop_group, wait_until_answering
from sdagent.errors import SdagentError
from sdagent.lifecycle.imds import TOKEN_PATH, TOKEN_TTL_HEADER

log = structlog.get_logger(__name__)

AEMM_VERSION = "v1.13.0"
# The main package is cmd/ec2-metadata-mock at this tag (cmd/ itself holds no Go files).
AEMM_PACKAGE = "github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock"
AEMM_BINARY = "ec2-metadata-mock"
INSTALL_TIMEOUT_S = 600.0  # a cold module cache downloads ~20 modules and compiles them
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 4000


class AemmStartError(SdagentError, RuntimeError):
    """AEMM could not be installed or did not come up."""


def cache_dir() -> Path:
    """Where the binary lives: ``$SDAGENT_CACHE_DIR/aemm/<version>`` (default ``~/.cache/sdagent``)."""
    base = os.environ.get("SDAGENT_CACHE_DIR") or Path.home() / ".cache" / "sdagent"
    return Path(base) / "aemm" / AEMM_VERSION


def ensure_binary() -> Path:
    """Build AEMM once per machine (under a lock, finished builds marked); return the binary's path."""
    root = cache_dir()
    binary = root / AEMM_BINARY
    marker = root / "complete"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        # Checked under the lock: another process may have finished the build while we waited.
        if marker.exists() and binary.exists():
            return binary
        marker.unlink(missing_ok=True)
        _go_install(root)
        marker.write_text(f"{AEMM_PACKAGE}@{AEMM_VERSION}\n")
    return binary


def _go_install(gobin: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise AemmStartError("go not found on PATH (Go 1.23+ is needed once, to build ec2-metadata-mock)")
    log.info("aemm.installing", package=AEMM_PACKAGE, version=AEMM_VERSION, into=str(gobin))
    started = time.monotonic()
    command = [go, "install", f"{AEMM_PACKAGE}@{AEMM_VERSION}"]
    try:
        result = subprocess.run(
            command, env={**os.environ, "GOBIN": str(gobin)}, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise AemmStartError(f"go install took longer than {INSTALL_TIMEOUT_S:.0f}s") from exc
    if result.returncode != 0:
        raise AemmStartError(f"go install failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    log.info("aemm.installed", seconds=round(time.monotonic() - started, 1))


def _rfc3339(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AemmServer:
    """One AEMM process on a loopback port; ``mode_args`` are its subcommand and that command's flags.

    IMDSv2 is required (``-I``), and ``-x -1`` lifts AEMM's default limit of answering the event
    paths to two client addresses only (later clients get 404, which would read as "no notice").
    """

    def __init__(self, mode_args: Sequence[str] = (), *, imdsv2: bool = True) -> None:
        self.mode_args = list(mode_args)
        self.imdsv2 = imdsv2
        self._port: int | None = None
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    # -- the modes the tests use -------------------------------------------------------------

    @classmethod
    def spot(
        cls,
        action: str = "terminate",
        at: datetime | str | None = None,
        *,
        delay_s: int = 0,
        rebalance_delay_s: int = 0,
        rebalance_time: datetime | str | None = None,
    ) -> AemmServer:
        """A spot interruption ``action`` (time pinned to ``at``), posted ``delay_s`` after start;
        the rebalance recommendation comes ``rebalance_delay_s`` after start."""
        args = ["spot", "-a", action, "-d", str(delay_s), "--rebalance-delay-sec", str(rebalance_delay_s)]
        if at is not None:
            args += ["-t", _rfc3339(at)]  # pinned: otherwise recomputed on every request
        if rebalance_time is not None:
            args += ["-r", _rfc3339(rebalance_time)]
        return cls(args)

    @classmethod
    def maintenance(
        cls, code: str = "system-reboot", state: str = "active", *, not_before: datetime | str | None = None
    ) -> AemmServer:
        """One scheduled maintenance event (``events`` mode; its ``-t`` is the state, not a time)."""
        args = ["events", "-o", code, "-t", state]
        if not_before is not None:
            args += ["-b", _rfc3339(not_before)]
        return cls(args)

    @classmethod
    def asg_lifecycle(cls, termination_delay_s: int = 0) -> AemmServer:
        """Target lifecycle state ``InService``, turning ``Terminated`` ``termination_delay_s`` after start."""
        return cls(["asglifecycle", "--asg-termination-delay-sec", str(termination_delay_s)])

    # -- process -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("AemmServer has not been started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> AemmServer:
        """Start AEMM (building it first if needed) and wait until it hands out tokens."""
        if self.running:
            return self
        binary = ensure_binary()
        started = time.monotonic()
        self._port = free_loopback_port()
        self._launch(binary)
        self._wait_until_ready()
        seconds = round(time.monotonic() - started, 2)
        log.info("aemm.started", endpoint=self.endpoint, mode=self.mode_args[:1], seconds=seconds)
        return self

    def stop(self) -> None:
        """Terminate AEMM (SIGKILL if it lingers) and delete its log."""
        if self._process is None:
            return
        stop_group(self._process, STOP_TIMEOUT_S)
        self._process = None
        _running_servers.discard(self)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> AemmServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _command(self, binary: Path) -> list[str]:
        flags = ["-n", "127.0.0.1", "-p", str(self._port), "-x", "-1"]
        if self.imdsv2:
            flags.append("-I")
        return [str(binary), *self.mode_args, *flags]

    def _launch(self, binary: Path) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="sdagent-aemm-"))
        # AEMM reads $HOME/aemm-config.json and AEMM_* variables: keep a developer's own out.
        env = {key: value for key, value in os.environ.items() if not key.startswith("AEMM_")}
        env["HOME"] = str(self._workdir)
        with open(self._log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _running_servers.add(self)

    @property
    def _log_path(self) -> Path:
        if self._workdir is None:
            raise AemmStartError("AEMM has no work directory: not started")
        return self._workdir / "aemm.log"

    def _wait_until_ready(self) -> None:
        endpoint = self.endpoint
        failure = wait_until_answering(
            self._process,
            lambda: _hands_out_tokens(endpoint),
            name="AEMM",
            address=endpoint,
            timeout_s=READY_TIMEOUT_S,
            interval_s=0.05,
        )
        if failure is not None:
            self._fail(failure)

    def _fail(self, reason: str) -> None:
        try:
            output = self._log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            output = "(no log)"
        self.stop()
        raise AemmStartError(f"{reason}; its output:\n{output}")


# No proxy: a developer's HTTP_PROXY must not see loopback requests.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _hands_out_tokens(endpoint: str) -> bool:
    request = urllib.request.Request(endpoint + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: "60"})
    try:
        with _direct.open(request, timeout=1) as response:
            return response.status == 200
    except (urllib.error.HTTPError, OSError):
        return False


# Servers still running when Python exits (e.g. an aborted test run) would otherwise outlive it.
_running_servers: set[AemmServer] = set()


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_running_servers):
        server.stop()
