"""The agent's configuration: one typed object, built once at start-up and validated at the edge.

Values come from a TOML file (``/etc/sdagent/sdagent.toml`` by default) and are overridden by
``SDAGENT_<SECTION>__<KEY>`` environment variables (e.g. ``SDAGENT_KAFKA__BOOTSTRAP_SERVERS``), so a
systemd drop-in or the launch template can change one value without templating the file. Every
module below receives only the section it needs. A bad value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from sdagent.errors import ConfigError
from sdagent.jobs import TOPIC_PATTERN, Limits
from sdagent.cache.config import CacheConfig
from sdagent.gateway.config import GatewayConfig
from sdagent.metrics.config import MetricsConfig

DEFAULT_CONFIG_PATH = Path("/etc/sdagent/sdagent.toml")
ENV_PREFIX = "SDAGENT_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaConfig(_Section):
    """How to reach the cluster and how the fleet shares the jobs topic."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = Field("sdagent", min_length=1)
    # "consumer" is KIP-848 (Kafka >= 4.0 brokers): incremental, broker-side assignment, so a scale
    # event moves only the partitions that must move. "classic" falls back to cooperative-sticky.
    group_protocol: Literal["consumer", "classic"] = "consumer"
    # Static membership keeps a vanished instance's partitions idle until its session times out:
    # good for in-place restarts, bad for spot instances that vanish; off by default (docs/kafka.md).
    static_membership: bool = False
    # Extra librdkafka settings for every client (security.protocol, sasl.*, ssl.*, client.rack).
    client_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # MSK IAM access control: the cluster's region. Every client then signs in over SASL_SSL with
    # OAUTHBEARER tokens signed by the instance role's credentials (docs/kafka.md).
    msk_iam_region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")


class TopicsConfig(_Section):
    """Topic names and the layout ``sdagent topics create`` gives them."""

    jobs: str = Field("sdagent.jobs", pattern=TOPIC_PATTERN)
    results: str = Field("sdagent.results", pattern=TOPIC_PATTERN)
    dead_letters: str = Field("sdagent.dead-letters", pattern=TOPIC_PATTERN)
    control: str = Field("sdagent.control", pattern=TOPIC_PATTERN)
    replies: str = Field("sdagent.replies", pattern=TOPIC_PATTERN)
    # Compacted: one record per agent with the models it holds (docs/model-affinity.md).
    agents: str = Field("sdagent.agents", pattern=TOPIC_PATTERN)
    # How jobs are keyed (docs/model-affinity.md): "job_id" spreads them evenly whatever the
    # model; "model" sends a model's jobs to at most model_lanes partitions (fewer switches, but a
    # fleet serving few models then keeps only that many agents busy: opt in with lanes sized).
    jobs_key: Literal["model", "job_id"] = "job_id"
    # Keys per model when keyed by model: a hot model fills up to this many partitions.
    model_lanes: int = Field(2, ge=1, le=1024)
    # One job runs per partition holder at a time: partitions >= the fleet's maximum size.
    jobs_partitions: int = Field(64, ge=1, le=10_000)
    results_partitions: int = Field(16, ge=1, le=10_000)
    replies_partitions: int = Field(16, ge=1, le=10_000)
    replication_factor: int = Field(3, ge=1, le=16)
    jobs_retention_h: float = Field(72, gt=0)
    results_retention_h: float = Field(72, gt=0)
    dead_letters_retention_h: float = Field(14 * 24, gt=0)
    replies_retention_h: float = Field(1, gt=0)

    @model_validator(mode="after")
    def _distinct_names(self) -> TopicsConfig:
        names = [self.jobs, self.results, self.dead_letters, self.control, self.replies, self.agents]
        if len(set(names)) != len(names):
            raise ValueError("topic names must all differ")
        return self


class RetryConfig(_Section):
    """Backoff for transient backend and upload failures; after ``max_attempts`` the job fails."""

    max_attempts: int = Field(4, ge=1, le=100)
    initial_backoff_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)


class IdempotencyConfig(_Section):
    """How long finished and cancelled job ids are remembered fleet-wide (docs/delivery.md)."""

    window_s: float = Field(3600.0, ge=60)
    # How long a redelivered job waits for this agent's view of the results topic to catch up.
    catch_up_timeout_s: float = Field(10.0, gt=0)


class OutputsConfig(_Section):
    """Where outputs go and how their links are made."""

    bucket: str = Field("sdagent-outputs", min_length=3, max_length=63)
    prefix: str = Field("outputs", pattern=r"^[A-Za-z0-9][A-Za-z0-9/._=-]*$")
    region: str | None = None
    endpoint_url: str | None = None  # for S3-compatible stores and tests; AWS needs none
    cloudfront_domain: str | None = None
    cloudfront_key_id: str | None = None
    cloudfront_private_key_file: Path | None = None
    url_ttl_s: int = Field(86400, ge=60, le=7 * 86400)  # SigV4 presigned URLs end at 7 days
    cache_control: str = "public, max-age=31536000, immutable"
    multipart_threshold_bytes: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)

    @model_validator(mode="after")
    def _signing_needs_both(self) -> OutputsConfig:
        if (self.cloudfront_key_id is None) != (self.cloudfront_private_key_file is None):
            raise ValueError("cloudfront_key_id and cloudfront_private_key_file go together")
        if self.cloudfront_key_id and not self.cloudfront_domain:
            raise ValueError("signed CloudFront URLs need cloudfront_domain")
        return self


class ProcessConfig(_Section):
    """How the agent launches and supervises the WebUI (``[backend.process]``).

    No ``command`` means the WebUI is managed elsewhere (its own systemd unit): the agent attaches
    to ``backend.url`` and only probes it.
    """

    command: list[str] | None = None  # e.g. ["./webui.sh", "--api", "--nowebui", "--port", "7861"]
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    ready_timeout_s: float = Field(300.0, gt=0)
    restart_backoff_initial_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)
    # More restarts than this within the window is a crash loop: reported, backoff at its cap.
    crash_loop_restarts: int = Field(5, ge=1)
    crash_loop_window_s: float = Field(300.0, gt=0)
    stop_timeout_s: float = Field(20.0, gt=0)
    max_rss_bytes: int | None = Field(None, gt=0)  # restart between jobs above this resident size
    max_gpu_memory_bytes: int | None = Field(None, gt=0)


class BackendConfig(_Section):
    """Which framework generates; ``simulated`` runs in-process for tests and the demo."""

    kind: Literal["simulated", "a1111", "comfyui"] = "simulated"
    url: str = "http://127.0.0.1:7861"  # A1111 --nowebui listens on 7861; ComfyUI on 8188
    models: list[str] = Field(default_factory=lambda: ["sd15.safetensors"])
    step_latency_s: float = Field(0.0, ge=0)  # simulated only
    switch_latency_s: float = Field(0.0, ge=0)  # simulated only
    request_timeout_s: float = Field(30.0, gt=0)
    progress_poll_s: float = Field(0.5, gt=0)
    # A job past this is hung: interrupted, then the process group is killed and restarted.
    job_timeout_s: float = Field(900.0, gt=0)
    # No progress for this long is also a hang.
    stall_timeout_s: float = Field(120.0, gt=0)
    workflows_dir: Path | None = None  # ComfyUI workflow templates that override the built-in ones
    process: ProcessConfig = Field(default_factory=ProcessConfig)


class LifecycleConfig(_Section):
    """The instance's Auto Scaling group and lifecycle hooks (``[lifecycle]``); all optional."""

    autoscaling_group: str | None = None
    launch_hook: str | None = None  # completed (CONTINUE) once the backend is ready to serve
    terminate_hook: str | None = None  # heartbeated while draining, completed when drained
    # AWS suggests 30-120 s heartbeats for capacity-rebalance drains.
    heartbeat_interval_s: float = Field(30.0, ge=1)
    protect_while_busy: bool = False  # scale-in protection; never stops a spot reclaim
    region: str | None = None
    endpoint_url: str | None = None  # tests point this at a fake

    @model_validator(mode="after")
    def _hooks_need_a_group(self) -> LifecycleConfig:
        if (self.launch_hook or self.terminate_hook or self.protect_while_busy) and not self.autoscaling_group:
            raise ValueError("lifecycle hooks and protection need autoscaling_group")
        return self


class ImdsConfig(_Section):
    """Watching the instance metadata service for spot, rebalance, lifecycle and maintenance notices."""

    enabled: bool = True
    # AWS suggests 5 s; aws-node-termination-handler polls every 2 s. A poll is one local request.
    interval_s: float = Field(2.0, gt=0, le=60)
    # Rebalance recommendation: "drain" leaves early; "hold" takes no new job for rebalance_hold_s
    # and then resumes if no interruption followed.
    rebalance: Literal["drain", "hold"] = "hold"
    rebalance_hold_s: float = Field(600.0, gt=0)


class LoggingConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"  # auto: JSON under systemd or a pipe
    level: Literal["debug", "info", "warning", "error"] = "info"


class AgentConfig(_Section):
    # None: the EC2 instance id from IMDS, else the host name (resolved by ``sdagent run``).
    instance_id: str | None = Field(None, min_length=1)
    # Jobs read from Kafka ahead of the running one and held here (also bounded to 8 MiB);
    # partitions are paused once this many wait and resumed when a quarter is used (0: paused
    # while any job runs). Only this agent reads its partitions, so holding them costs the fleet
    # nothing, and the jobs still held must cover the fetch a resume costs, up to a second at
    # the fastest job rate (bench/pipeline.py: 64 ran dry 23 times in 2000 jobs, 256 twice).
    read_ahead: int = Field(256, ge=0, le=10_000)
    # Minimum time between two progress events of one job; progress is advisory, keep it cheap.
    progress_interval_s: float = Field(0.5, ge=0)
    # Longest a drain may take when no notice gives a deadline (SIGTERM); below systemd's
    # TimeoutStopSec and the 120 s spot warning.
    drain_timeout_s: float = Field(90.0, gt=0)
    # A job in flight at drain is let finish only if its estimate leaves this much before the
    # deadline (upload, answer, commit, leaving the group); otherwise it is released.
    drain_margin_s: float = Field(15.0, ge=0)


class Settings(BaseModel):
    """The whole configuration; sections as in ``docs/configuration.md``."""

    model_config = ConfigDict(extra="forbid")

    agent: AgentConfig = Field(default_factory=AgentConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    limits: Limits = Field(default_factory=Limits)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
    imds: ImdsConfig = Field(default_factory=ImdsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class _FileAndEnvironment(BaseSettings, Settings):
    """Settings read from the file's values (as init values) and ``SDAGENT_*`` variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init values); no .env or secrets dir.
        return env_settings, init_settings


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the configuration from ``path`` (optional), then the environment, then ``overrides``
    (command-line flags), each beating the one before.

    Raises ConfigError naming the first bad key, e.g. ``kafka.group_protocol: Input should be ...``.
    """
    values = _read_toml(path) if path is not None else {}
    try:
        merged = _FileAndEnvironment(**values).model_dump()  # the environment beats the file
        for section, section_values in (overrides or {}).items():
            merged.setdefault(section, {}).update(section_values)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in error["loc"]) or "(config)"
        raise ConfigError(key, f"{error['msg']} (got {error.get('input')!r})") from None
    except SettingsError as exc:  # an SDAGENT_* value that should be JSON (a table or a list) is not
        raise _bad_json_variable(exc) from None


def _bad_json_variable(error: SettingsError) -> ConfigError:
    """Name the variable whose value is not JSON: pydantic-settings names only the section."""
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or not value.lstrip().startswith(("{", "[")):
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            key = name[len(ENV_PREFIX):].lower().replace("__", ".")
            return ConfigError(key, f"{name} is not valid JSON: {exc}")
    return ConfigError("(environment)", str(error))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
