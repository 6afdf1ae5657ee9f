"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for tests and demos.

The broker runs from Maven Central jars (see ``kafka-pom.xml``) cached outside the repository, so
nothing but Java 17 and Maven is needed on the machine.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import structlog

from sdagent.devstack.process import signal_group, stop_group, wait_until_answering
from sdagent.errors import SdagentError
from sdagent.webui.process import set_parent_death_signal

log = structlog.get_logger(__name__)

KAFKA_VERSION = "4.4.0"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 40

# Serial GC and C1-only JIT: on a 2-core machine a parallel GC and C2 compiler threads compete
# with Kafka's own startup for the CPUs. Timestamps make the broker log useful for debugging.
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
)

# Settings for a throwaway single-node broker. Replication factors must be 1 (one node); the
# internal topics get one partition so the first consumer group or transaction doesn't wait for
# 50 partitions to be created; the KIP-848 group timeouts are short so that consumers joining,
# leaving or dying rebalance within seconds in tests.
TEST_BROKER_SETTINGS = {
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.consumer.heartbeat.interval.ms": "500",
    "group.consumer.min.heartbeat.interval.ms": "500",
    "group.consumer.session.timeout.ms": "6000",
    "group.consumer.min.session.timeout.ms": "6000",
    # Share groups (KIP-932): test-speed bounds, so tests may set group locks of a few seconds
    # and a dead member's records come back within seconds (docs/share-groups.md).
    "group.share.min.record.lock.duration.ms": "1000",
    "group.share.heartbeat.interval.ms": "500",
    "group.share.min.heartbeat.interval.ms": "500",
    "group.share.session.timeout.ms": "6000",
    "group.share.min.session.timeout.ms": "6000",
    "num.partitions": "1",
    "auto.create.topics.enable": "false",
    # Fewer threads: the defaults are sized for servers, not a 2-core test machine.
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
    "group.coordinator.threads": "1",
    "share.coordinator.threads": "1",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
}


class KafkaStartError(SdagentError, RuntimeError):
    """The broker could not be installed, formatted or started."""


def cache_dir() -> Path:
    """Where downloaded jars live: ``$SDAGENT_CACHE_DIR`` or ``~/.cache/sdagent``."""
    base = os.environ.get("SDAGENT_CACHE_DIR") or Path.home() / ".cache" / "sdagent"
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def ensure_jars() -> Path:
    """Download Kafka and its runtime dependencies once; return the directory holding the jars."""
    root = cache_dir()
    lib = root / "lib"
    marker = root / "complete"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):
        # Checked under the lock: another process may have finished while we waited.
        if marker.exists():
            return lib
        shutil.rmtree(lib, ignore_errors=True)  # a half-finished copy from an interrupted run
        shutil.rmtree(root / "cds", ignore_errors=True)  # class archives of the old jars
        _copy_dependencies(lib)
        marker.write_text(f"{KAFKA_VERSION}\n")
    return lib


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an flock on ``path`` (a local file) for the block: one download per cache across processes."""
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _copy_dependencies(lib: Path) -> None:
    log.info("kafka.jars.downloading", version=KAFKA_VERSION, into=str(lib))
    started = time.monotonic()
    with resources.as_file(resources.files(__package__) / "kafka-pom.xml") as pom:
        command = [
            "mvn", "-B", "-q", "-f", str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={lib}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaStartError(f"mvn failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    log.info("kafka.jars.downloaded", seconds=round(time.monotonic() - started, 1))


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` that SIGTERMs the child when the thread that started it dies (Linux only).

    Stops a hard-killed test run (SIGKILL, os._exit) from leaving brokers and servers behind.
    """
    set_parent_death_signal(signal.SIGTERM)


def random_cluster_id() -> str:
    """A Kafka cluster id, generated like ``StorageTool random-uuid`` without starting a JVM.

    Kafka's Uuid is 16 random bytes in unpadded URL-safe base64; ids starting with '-' are
    avoided because they look like command-line options.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class ClassArchive:
    """A JVM class-data-sharing archive of the broker's classes, recorded once per machine.

    Loading Kafka's classes from the archive instead of the jars measured 2.9 s -> 1.6 s for
    broker start and 1.3 s -> 0.8 s for storage formatting on 2 cores. The first broker run
    records it at exit; later JVMs (broker and StorageTool) map it. The JVM silently ignores an
    archive that doesn't match its version or classpath, so a stale one only costs the speedup.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"kafka-{_java_fingerprint()}.jsa"
        self._recording: Path | None = None

    def use_options(self) -> list[str]:
        """JVM options that map the archive, if one has been recorded."""
        return [f"-XX:SharedArchiveFile={self.path}"] if self.path.exists() else []

    def record_options(self) -> list[str]:
        """JVM options that record the archive at exit, if it is missing and can be recorded."""
        if self.path.exists() or not _jdk_has_base_archive():
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A private file, so two brokers recording at once don't write the same one.
        self._recording = self.path.with_suffix(f".{os.getpid()}.{id(self)}.tmp")
        return [f"-XX:ArchiveClassesAtExit={self._recording}"]

    def finish_recording(self, clean_exit: bool) -> None:
        """Publish the recorded archive if the JVM exited cleanly (a killed JVM writes none)."""
        if self._recording is None:
            return
        if clean_exit and self._recording.exists():
            os.replace(self._recording, self.path)
            log.info("kafka.class_archive.recorded", path=str(self.path))
        else:
            self._recording.unlink(missing_ok=True)
        self._recording = None


def _java_binary() -> Path:
    java = shutil.which("java")
    if java is None:
        raise KafkaStartError("java not found on PATH (Java 17+ is needed to run Kafka)")
    return Path(java).resolve()


def _java_fingerprint() -> str:
    """Identifies the installed JVM without starting it: archives only work with their own JVM."""
    java = _java_binary()
    path_hash = hashlib.sha1(str(java).encode()).hexdigest()[:8]
    return f"{path_hash}-{java.stat().st_mtime_ns}"


def _jdk_has_base_archive() -> bool:
    # Recording a dynamic archive needs the JDK's base archive; without it the JVM won't start.
    java_home = _java_binary().parent.parent
    return (java_home / "lib" / "server" / "classes.jsa").exists()


@dataclass(frozen=True)
class ExternalKafka:
    """A broker someone else runs (``SDAGENT_TEST_KAFKA``); starting and stopping do nothing."""

    bootstrap: str

    def start(self) -> ExternalKafka:
        return self

    def stop(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


def broker_from_env() -> ExternalKafka | None:
    """The broker named by ``SDAGENT_TEST_KAFKA``, or None when we should start our own."""
    bootstrap = os.environ.get("SDAGENT_TEST_KAFKA", "").strip()
    return ExternalKafka(bootstrap) if bootstrap else None


class KafkaBroker:
    """One real Kafka broker on loopback ports, with its data in a temporary directory."""

    def __init__(self) -> None:
        self._lib: Path | None = None
        self._class_archive: ClassArchive | None = None
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._process: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self._port is None:
            raise RuntimeError("KafkaBroker has not been started")
        return f"127.0.0.1:{self._port}"

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> KafkaBroker:
        """Start the broker (formatting fresh storage the first time) and wait until it answers."""
        if self.running:
            return self
        started = time.monotonic()
        if self._data_dir is None:
            self._lib = ensure_jars()
            self._class_archive = ClassArchive(cache_dir() / "cds")
            self._prepare_storage()
        self._launch()
        self._wait_until_ready()
        log.info(
            "kafka.started",
            bootstrap=self.bootstrap,
            seconds=round(time.monotonic() - started, 1),
        )
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut down cleanly (SIGTERM); SIGKILL if it takes longer than ``timeout``."""
        if self._process is None:
            return
        if self._process.poll() is None:
            started = time.monotonic()
            if not stop_group(self._process, timeout):
                log.warning("kafka.stop.timeout", timeout=timeout)
                self._forget_process(clean_exit=False)
                return
            log.info("kafka.stopped", seconds=round(time.monotonic() - started, 1))
        self._forget_process(clean_exit=True)

    def kill(self) -> None:
        """Stop abruptly, like a crashed machine (no controlled shutdown)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            signal_group(self._process, signal.SIGKILL)
            self._process.wait()
            log.info("kafka.killed")
        self._forget_process(clean_exit=False)

    def restart(self) -> KafkaBroker:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the broker and delete its data directory."""
        self.stop()
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._port = self._controller_port = None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    # -- storage -----------------------------------------------------------------------------

    def _prepare_storage(self) -> None:
        self._data_dir = Path(tempfile.mkdtemp(prefix="sdagent-kafka-"))
        self._port = free_loopback_port()
        self._controller_port = free_loopback_port()
        try:
            self._config_path.write_text(self._server_properties())
            self._format_storage()
        except BaseException:
            self.cleanup()  # so that the next start() prepares storage again
            raise

    @property
    def _dir(self) -> Path:
        if self._data_dir is None:
            raise KafkaStartError("the broker's storage is not prepared")
        return self._data_dir

    @property
    def _archive(self) -> ClassArchive:
        if self._class_archive is None:
            raise KafkaStartError("the broker's class archive is not set up")
        return self._class_archive

    @property
    def _config_path(self) -> Path:
        return self._dir / "server.properties"

    @property
    def _log_path(self) -> Path:
        return self._dir / "broker.log"

    def _server_properties(self) -> str:
        plaintext = f"127.0.0.1:{self._port}"
        controller = f"127.0.0.1:{self._controller_port}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._dir / "logs"),
            **TEST_BROKER_SETTINGS,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _format_storage(self) -> None:
        command = [
            *self._java_command("kafka.tools.StorageTool", self._archive.use_options()),
            "format", "--standalone",
            "--cluster-id", random_cluster_id(),
            "--config", str(self._config_path),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KafkaStartError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _java_command(self, main_class: str, archive_options: list[str]) -> list[str]:
        return ["java", *JVM_OPTIONS, *archive_options, "-cp", f"{self._lib}/*", main_class]

    # -- process -----------------------------------------------------------------------------

    def _launch(self) -> None:
        archive = self._archive
        archive_options = archive.use_options() or archive.record_options()
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - open for the broker's life, closed once it exited
        self._process = subprocess.Popen(
            [*self._java_command("kafka.Kafka", archive_options), str(self._config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._data_dir,
            start_new_session=True,  # its own process group, so signals reach the whole JVM tree
            preexec_fn=die_with_parent,
        )
        _running_brokers.add(self)

    def _wait_until_ready(self) -> None:
        # Imported here so that importing this module doesn't load librdkafka.
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 500,
                "log_level": 0,  # connection-refused noise is expected while the JVM boots
            }
        )

        def answers() -> bool:
            try:
                admin.list_topics(timeout=1)
                return True
            except KafkaException:
                return False

        failure = wait_until_answering(
            self._process, answers, name="Kafka", address=self.bootstrap, timeout_s=READY_TIMEOUT_S
        )
        if failure is not None:
            self._fail(failure)

    def _fail(self, reason: str) -> None:
        tail = self._log_tail()
        self.kill()
        raise KafkaStartError(f"{reason}; last lines of {self._log_path}:\n{tail}")

    def _log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no broker log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def _forget_process(self, clean_exit: bool) -> None:
        self._archive.finish_recording(clean_exit)
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _running_brokers.discard(self)


# Brokers still running when Python exits (e.g. an aborted test run) would otherwise outlive it.
_running_brokers: set[KafkaBroker] = set()


@atexit.register
def _kill_leftover_brokers() -> None:
    for broker in list(_running_brokers):
        broker.kill()
