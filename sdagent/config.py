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

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from sdagent.agent.config import AgentConfig, IdempotencyConfig, RetryConfig
from sdagent.backends.config import BackendConfig, SimulatedBackendConfig
from sdagent.backends.registry import parse_config as parse_backend_config
from sdagent.cache.config import CacheConfig
from sdagent.errors import ConfigError
from sdagent.gateway.config import GatewayConfig
from sdagent.jobs import Limits
from sdagent.kafka.config import KafkaConfig, TopicsConfig
from sdagent.lifecycle.config import ImdsConfig, LifecycleConfig
from sdagent.metrics.config import MetricsConfig
from sdagent.storage.config import OutputsConfig

DEFAULT_CONFIG_PATH = Path("/etc/sdagent/sdagent.toml")
ENV_PREFIX = "SDAGENT_"


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "json", "console"] = "auto"  # auto: JSON under systemd or a pipe
    level: Literal["debug", "info", "warning", "error"] = "info"


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
    # Each kind has its own class (sdagent.backends.registry); dumped as that class, not the base.
    backend: SerializeAsAny[BackendConfig] = Field(default_factory=SimulatedBackendConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
    imds: ImdsConfig = Field(default_factory=ImdsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_of_its_kind(cls, value: Any) -> BackendConfig:
        return parse_backend_config(value)

    @model_validator(mode="after")
    def _model_topics_in_share_groups(self) -> Settings:
        if self.topics.model_topics and self.kafka.consumption != "share":
            raise ValueError(
                "topics.model_topics is for kafka.consumption = share; partition mode keys jobs by model (jobs_key)"
            )
        return self

    @model_validator(mode="after")
    def _attempts_within_deliveries(self) -> Settings:
        # A share group's delivery count is the attempt count: the last attempt must come before
        # the delivery on which the agent gives a record up unrun.
        limit = self.kafka.share.delivery_limit
        if self.kafka.consumption == "share" and self.agent.record_attempts >= limit:
            raise ValueError(
                f"agent.record_attempts ({self.agent.record_attempts}) must be below "
                f"kafka.share.delivery_limit ({limit}) when kafka.consumption is share"
            )
        return self


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
        # Only what the file and the environment set: a default of one backend kind must not be
        # carried into a kind an override picks.
        merged = _FileAndEnvironment(**values).model_dump(exclude_unset=True)  # the environment beats the file
        for section, section_values in (overrides or {}).items():
            merged.setdefault(section, {}).update(section_values)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc) from None
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
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
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
