"""The composition root: the only place that turns the configuration into parts.

:func:`build_agent` builds every part an agent runs (Kafka clients, backend and its WebUI
supervisor, S3 inputs and outputs, the model cache, metrics, the IMDS notice watcher, Auto Scaling
membership) and hands each only its own section of the configuration. Parts that must reach each
other at run time (a lost GPU holds the intake, the WebUI's state holds it too) meet through
:class:`~sdagent.agent.controls.Controls`, built first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import boto3
import structlog
from botocore.config import Config as BotoConfig
from confluent_kafka import Consumer, Producer, ShareConsumer
from confluent_kafka.admin import AdminClient

from sdagent.agent.agent import Agent, AgentParts
from sdagent.agent.beacon import AgentBeacon, AgentState
from sdagent.agent.chores import Chores
from sdagent.agent.controls import Controls
from sdagent.agent.intake import Intake, JobIntake
from sdagent.agent.lanes import Lane
from sdagent.agent.model_lanes import ModelLanes
from sdagent.agent.runner import JobRunner
from sdagent.agent.share_intake import ShareIntake
from sdagent.agent.startup import Startup
from sdagent.backends import registry
from sdagent.backends.base import Backend
from sdagent.backends.config import BackendConfig, WebUIBackendConfig
from sdagent.cache.assembly import build_model_cache
from sdagent.cache.cache import ModelCache
from sdagent.cache.config import CacheConfig
from sdagent.cache.manifest import KIND_DIRS
from sdagent.cache.serving import CachedModels
from sdagent.cache.watch import ManifestWatcher
from sdagent.config import Settings
from sdagent.errors import ConfigError
from sdagent.kafka.clients import (
    admin_config,
    jobs_consumer_config,
    ledger_reader_config,
    producer_config,
    reader_config,
    share_consumer_config,
)
from sdagent.kafka.ledger import JobLedger
from sdagent.kafka.publisher import StatusPublisher
from sdagent.kafka.replies import ReplyPolicy, partitions_from
from sdagent.kafka.share_group import LaneSpec, ensure_share_groups, lane_specs, model_lane_specs
from sdagent.lifecycle.autoscaling import GroupMembership, LifecycleActions
from sdagent.lifecycle.config import LifecycleConfig
from sdagent.lifecycle.imds import ImdsClient, ImdsError, InstanceIdentity, endpoint_from_environment, instance_identity
from sdagent.lifecycle.interruptions import InterruptionPolicy, InterruptionWatch
from sdagent.lifecycle.notices import NoticeWatcher
from sdagent.lifecycle.systemd import from_environment as systemd_notifier
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.storage.config import OutputsConfig
from sdagent.storage.inputs import InputResolver
from sdagent.storage.outputs import OutputStore
from sdagent.webui.supervisor import WebUISupervisor

log = structlog.get_logger(__name__)

# Retries are the job loop's business (with backoff and a job-level attempt count): botocore
# retries once more itself for throttling and dropped connections, in its standard mode.
# SigV4 explicitly: botocore still presigns with SigV2 in us-east-1 when it is left unset.
_S3_CONFIG = BotoConfig(
    signature_version="s3v4", retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=60
)
_CONTROL_PLANE_CONFIG = BotoConfig(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=10)


def build_agent(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    backend: Backend | None = None,
    consumer_factory: Callable[[dict], Consumer] = Consumer,
    producer_factory: Callable[[dict], Producer] = Producer,
    share_consumer_factory: Callable[[dict], ShareConsumer] = ShareConsumer,
) -> Agent:
    """The agent of ``settings``, not started; ``environ`` holds systemd's and IMDS's variables.
    ``backend`` replaces the configured one (tests)."""
    controls = Controls()
    imds = _imds_client(settings, environ)
    identity = _identity(imds) if imds is not None else None
    # The configured id, else EC2's, else the host name: decided here, once, never written back.
    instance_id = settings.agent.instance_id or (identity.instance_id if identity else socket.gethostname())
    model_cache = _open_model_cache(settings.cache)
    backend = backend or registry.build_backend(settings.backend, checkpoints_dir(settings.cache))
    supervisor = build_supervisor(settings.backend, backend)
    metrics = build_agent_metrics(
        settings, instance_id, identity, on_gpu_lost=_on_gpu_lost(controls, settings, instance_id)
    )
    cached = (
        CachedModels(model_cache, metrics.jobs, webui_models=lambda: backend.health().models) if model_cache else None
    )
    s3 = build_s3_client(settings.outputs)
    producer = producer_factory(producer_config(settings.kafka, f"sdagent-{instance_id}"))
    publisher = StatusPublisher(producer, settings.topics, instance_id)
    ledger = JobLedger(
        consumer_factory(ledger_reader_config(settings.kafka)),
        consumer_factory(reader_config(settings.kafka, "ledger-probe")),
        settings.topics.results,
        settings.topics.control,
        settings.idempotency.window_s,
    )
    runner = JobRunner(
        backend, InputResolver(s3), build_outputs(settings.outputs, s3), publisher, ledger,
        limits=settings.limits, retry=settings.retry, catch_up_timeout_s=settings.idempotency.catch_up_timeout_s,
        progress_interval_s=settings.agent.progress_interval_s, watch=supervisor,
        backend_ready_wait_s=settings.backend.ready_timeout_s, recorder=metrics.jobs, models=cached,
        replies=ReplyPolicy(settings.topics, partitions_from(producer)),
    )  # fmt: skip
    intake = _build_intake(settings, instance_id, runner, backend, controls, metrics, publisher,
                           consumer_factory, share_consumer_factory)  # fmt: skip
    ledger.on_cancel(intake.cancel)
    if supervisor is not None:
        # Intake follows the WebUI: held while it is down or restarting, resumed once it is back.
        supervisor.on_state_change(
            lambda ready, _reason: controls.unhold("backend_down") if ready else controls.hold("backend_down")
        )
        supervisor.on_hang(lambda job_id, _reason: intake.abort_inflight("hung", job_id))
    group = build_group_membership(settings.lifecycle, instance_id)
    notifier = systemd_notifier(environ)
    beacon = AgentBeacon(producer, settings.topics.agents, instance_id, _cached_model_names(model_cache))
    parts = AgentParts(
        instance_id=instance_id,
        jobs_topic=settings.topics.jobs,
        controls=controls,
        backend=backend,
        intake=intake,
        runner=runner,
        ledger=ledger,
        publisher=publisher,
        startup=Startup(
            backend,
            controls,
            settings.backend.ready_timeout_s,
            supervisor=supervisor,
            cache=model_cache,
            models=cached,
            cache_config=settings.cache,
        ),  # fmt: skip
        chores=Chores(
            notifier,
            beacon,
            state=_beacon_state(settings.topics.jobs, intake, runner, controls),
            group=group,
            supervisor=supervisor,
            job_metrics=metrics.jobs,
        ),  # fmt: skip
        notifier=notifier,
        supervisor=supervisor,
        metrics=metrics,
        model_cache=model_cache,
        cache_watcher=_cache_watcher(model_cache, cached, settings.cache),
        group=group,
        interruptions=_interruptions(imds, settings, controls),
    )
    return Agent(parts, settings.agent)


# --- the parts, one builder each -------------------------------------------------------------


def checkpoints_dir(cache: CacheConfig) -> Path | None:
    """Where the model cache puts checkpoints (the WebUI's checkpoint folder); None without a cache."""
    return cache.dir / KIND_DIRS["checkpoint"] if cache.source is not None else None


def build_supervisor(config: BackendConfig, backend: Backend) -> WebUISupervisor | None:
    """The WebUI's supervisor; None for a kind that runs no process (the in-process simulator)."""
    if not registry.kind_of(config.kind).supervised:
        return None
    if not isinstance(config, WebUIBackendConfig):
        raise ConfigError("backend.kind", f"{config.kind!r} is supervised but has no [backend.process] section")
    return WebUISupervisor.for_backend(config, backend)


def build_s3_client(config: OutputsConfig):
    return boto3.client("s3", region_name=config.region, endpoint_url=config.endpoint_url, config=_S3_CONFIG)


def build_outputs(config: OutputsConfig, s3_client) -> OutputStore:
    private_key = config.cloudfront_private_key_file.read_bytes() if config.cloudfront_private_key_file else None
    return OutputStore(
        s3_client,
        config.bucket,
        config.prefix,
        cloudfront_domain=config.cloudfront_domain,
        cloudfront_key_id=config.cloudfront_key_id,
        cloudfront_private_key_pem=private_key,
        url_ttl_s=config.url_ttl_s,
        cache_control=config.cache_control,
        multipart_threshold=config.multipart_threshold_bytes,
    )


def build_group_membership(config: LifecycleConfig, instance_id: str) -> GroupMembership | None:
    """This instance's Auto Scaling membership, or None outside a group."""
    if config.autoscaling_group is None:
        return None
    return GroupMembership(
        LifecycleActions(_autoscaling_client(config)),
        config.autoscaling_group,
        instance_id,
        launch_hook=config.launch_hook,
        terminate_hook=config.terminate_hook,
        heartbeat_interval_s=config.heartbeat_interval_s,
        protect_while_busy=config.protect_while_busy,
    )


def build_agent_metrics(
    settings: Settings, instance_id: str, identity: InstanceIdentity | None, on_gpu_lost: Callable[[int, str], None]
) -> MetricsPublisher:
    """The metrics loop for this instance (not started); ``identity`` is IMDS's, or None off EC2."""
    from sdagent.kafka.clients import committed_reader_config
    from sdagent.metrics.assembly import build_metrics
    from sdagent.metrics.dimensions import InstanceIdentity as MetricsIdentity

    region = settings.metrics.region or (identity.region if identity else None) or settings.outputs.region
    return build_metrics(
        settings.metrics,
        MetricsIdentity(
            instance_id, identity.instance_type if identity else None, settings.lifecycle.autoscaling_group
        ),
        region=region,
        kafka_admin=AdminClient(admin_config(settings.kafka)),
        committed_reader=Consumer(committed_reader_config(settings.kafka)) if settings.metrics.queue_backlog else None,
        jobs_topic=settings.topics.jobs,
        consumer_group=settings.kafka.group_id,
        on_gpu_lost=on_gpu_lost,
    )


def _autoscaling_client(config: LifecycleConfig):
    return boto3.client(
        "autoscaling", region_name=config.region, endpoint_url=config.endpoint_url, config=_CONTROL_PLANE_CONFIG
    )


def _open_model_cache(config: CacheConfig) -> ModelCache | None:
    """The model cache of ``[cache]``, or None; a directory it cannot create or use is a config error."""
    try:
        return build_model_cache(config)
    except OSError as exc:
        raise ConfigError("cache.dir", f"cannot use {config.dir}: {exc}") from exc


def _imds_client(settings: Settings, environ: Mapping[str, str]) -> ImdsClient | None:
    endpoint = endpoint_from_environment(environ) if settings.imds.enabled else None
    return None if endpoint is None else ImdsClient(endpoint)


def _identity(imds: ImdsClient) -> InstanceIdentity | None:
    try:
        return instance_identity(imds)
    except ImdsError as exc:  # not on EC2, or IMDS away: the host name stands in
        log.warning("imds.identity_unavailable", error=str(exc))
        return None


def _interruptions(imds: ImdsClient | None, settings: Settings, controls: Controls) -> InterruptionWatch | None:
    if imds is None:
        return None
    policy = InterruptionPolicy(
        controls, rebalance=settings.imds.rebalance, rebalance_hold_s=settings.imds.rebalance_hold_s
    )
    return InterruptionWatch(NoticeWatcher(imds, settings.imds.interval_s, on_notice=policy), policy)


def _on_gpu_lost(controls: Controls, settings: Settings, instance_id: str) -> Callable[[int, str], None]:
    """A GPU that is lost will not come back: take no more work and have the group replace us."""

    def lost(_index: int, _reason: str) -> None:
        controls.hold("gpu_lost")
        if settings.lifecycle.autoscaling_group is not None:
            from sdagent.metrics.health import AutoScalingHealth

            AutoScalingHealth(_autoscaling_client(settings.lifecycle)).set_unhealthy(instance_id)

    return lost


def _build_intake(
    settings: Settings,
    instance_id: str,
    runner: JobRunner,
    backend: Backend,
    controls: Controls,
    metrics: MetricsPublisher,
    publisher: StatusPublisher,
    consumer_factory: Callable[[dict], Consumer],
    share_consumer_factory: Callable[[dict], ShareConsumer],
) -> JobIntake:
    agent = settings.agent
    if settings.kafka.consumption == "share":
        return _share_intake(settings, instance_id, runner, backend, controls, publisher, share_consumer_factory)
    return Intake(
        consumer_factory(jobs_consumer_config(settings.kafka, instance_id)),
        settings.topics.jobs,
        runner,
        backend.interrupt,
        controls,
        read_ahead=agent.read_ahead,
        record_attempts=agent.record_attempts,
        record_retry_backoff_s=agent.record_retry_backoff_s,
        on_assignment=_follow_assignment(metrics, settings.topics.jobs),
        priority_topic=settings.topics.priority_jobs,
        loaded_model=lambda: runner.current_model,
    )


def _share_intake(
    settings: Settings,
    instance_id: str,
    runner: JobRunner,
    backend: Backend,
    controls: Controls,
    publisher: StatusPublisher,
    share_consumer_factory: Callable[[dict], ShareConsumer],
) -> ShareIntake:
    share = settings.kafka.share
    backend_config = settings.backend
    if isinstance(backend_config, WebUIBackendConfig) and backend_config.job_timeout_s > share.lock_duration_s:
        # A job past the lock goes to a second agent while it still runs (docs/share-groups.md).
        log.warning("share_group.lock_shorter_than_job_timeout", lock_s=share.lock_duration_s,
                    job_timeout_s=backend_config.job_timeout_s)  # fmt: skip
    fixed = lane_specs(settings.kafka.group_id, settings.topics)
    models = model_lane_specs(settings.kafka.group_id, settings.topics)

    def lane(spec: LaneSpec) -> Lane:
        config = share_consumer_config(settings.kafka, instance_id, spec.group)
        return Lane(spec.name, spec.topic, lambda: share_consumer_factory(config))

    groups = [spec.group for spec in fixed + models]
    return ShareIntake(
        [lane(spec) for spec in fixed],
        runner,
        backend.interrupt,
        controls,
        lock_duration_s=share.lock_duration_s,
        delivery_limit=share.delivery_limit,
        copy_back=publisher.copy_back,
        record_attempts=settings.agent.record_attempts,
        prepare=lambda: ensure_share_groups(AdminClient(admin_config(settings.kafka)), groups, share),
        model_lanes=ModelLanes([lane(spec) for spec in models], settings.topics.model_topic, instance_id)
        if models
        else None,
    )


def _follow_assignment(metrics: MetricsPublisher, jobs_topic: str) -> Callable[[frozenset[tuple[str, int]]], None]:
    def follow(assigned: frozenset[tuple[str, int]]) -> None:
        # Exactly one member publishes the group's backlog: the holder of partition 0.
        if metrics.lag is not None:
            metrics.lag.set_holds_partition_zero((jobs_topic, 0) in assigned)

    return follow


def _beacon_state(
    jobs_topic: str, intake: JobIntake, runner: JobRunner, controls: Controls
) -> Callable[[], AgentState]:
    def state() -> AgentState:
        partitions = frozenset(p for topic, p in intake.partitions if topic == jobs_topic)
        return AgentState(runner.current_model, intake.load(), partitions, not controls.held, runner.mean_switch_s)

    return state


def _cached_model_names(cache: ModelCache | None) -> Callable[[], list[str]]:
    return (lambda: [entry.name for entry in cache.ls()]) if cache is not None else list


def _cache_watcher(
    cache: ModelCache | None, cached: CachedModels | None, config: CacheConfig
) -> ManifestWatcher | None:
    if cache is None or cached is None:
        return None
    return ManifestWatcher(cache, cached.models_changed, interval_s=config.poll_interval_s, use_events=config.watch)
