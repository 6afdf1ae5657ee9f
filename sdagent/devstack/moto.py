"""A local AWS (S3 and friends) for tests and demos: moto's server mode on a loopback port."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import structlog

from sdagent.devstack.kafka import die_with_parent, free_loopback_port
from sdagent.devstack.process import stop_group, wait_until_answering
from sdagent.errors import SdagentError

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
DUMMY_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}


class MotoStartError(SdagentError, RuntimeError):
    """The moto server did not come up."""


class MotoServer:
    """moto's HTTP server in a subprocess; every AWS service it fakes answers on ``endpoint``."""

    def __init__(self) -> None:
        self._port: int | None = None
        self._process: subprocess.Popen | None = None
        self._log_path: Path | None = None

    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("MotoServer has not been started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> MotoServer:
        """Start the server and wait until it answers HTTP."""
        if self._process is not None and self._process.poll() is None:
            return self
        started = time.monotonic()
        self._port = free_loopback_port()
        self._launch()
        self._wait_until_ready()
        log.info("moto.started", endpoint=self.endpoint, seconds=round(time.monotonic() - started, 1))
        return self

    def stop(self) -> None:
        """Terminate the server (SIGKILL if it doesn't exit in time) and delete its log."""
        if self._process is None:
            return
        if self._process.poll() is None:
            stop_group(self._process, STOP_TIMEOUT_S)
            log.info("moto.stopped")
        self._process = None
        _running_servers.discard(self)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _launch(self) -> None:
        log_fd, log_name = tempfile.mkstemp(prefix="sdagent-moto-", suffix=".log")
        self._log_path = Path(log_name)
        with os.fdopen(log_fd, "wb") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sdagent.devstack.moto_server", "-H", "127.0.0.1", "-p", str(self._port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # keeps Ctrl-C in a terminal from reaching it first
                preexec_fn=die_with_parent,
            )
        _running_servers.add(self)

    def _wait_until_ready(self) -> None:
        endpoint = self.endpoint
        failure = wait_until_answering(
            self._process, lambda: _answers_http(endpoint), name="moto", address=endpoint, timeout_s=READY_TIMEOUT_S
        )
        if failure is not None:
            self._fail(failure)

    def _fail(self, reason: str) -> None:
        output = self._log_path.read_text(errors="replace")[-4000:] if self._log_path else "(no log)"
        self.stop()
        raise MotoStartError(f"{reason}; its output:\n{output}")


# Servers still running when Python exits (e.g. an aborted test run) would otherwise outlive it.
_running_servers: set[MotoServer] = set()


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_running_servers):
        server.stop()


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is listening and serving
    except OSError:
        return False


def aws_client(service: str, endpoint: str, region: str = "us-east-1"):
    """A boto3 client for ``service`` talking to ``endpoint`` with dummy credentials."""
    import boto3
    from botocore.config import Config

    # Path-style S3 addressing: bucket names can't become subdomains of 127.0.0.1.
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2})
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        config=config,
        **DUMMY_CREDENTIALS,
    )
