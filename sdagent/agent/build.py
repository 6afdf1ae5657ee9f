"""Builds the real parts named by the configuration: the backend, the S3 inputs and outputs."""

from __future__ import annotations

import boto3
from botocore.config import Config as BotoConfig

from pathlib import Path

from sdagent.backends.base import Backend
from sdagent.cache.config import CacheConfig
from sdagent.cache.manifest import KIND_DIRS
from sdagent.config import BackendConfig, LifecycleConfig, OutputsConfig, Settings
from sdagent.storage.inputs import InputResolver
from sdagent.lifecycle.autoscaling import LifecycleActions
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.storage.outputs import OutputStore
from sdagent.webui.supervisor import WebUISupervisor

# Retries are the job loop's business (with backoff and a job-level attempt count): botocore
# retries once more itself for throttling and dropped connections, in its standard mode.
# SigV4 explicitly: botocore still presigns with SigV2 in us-east-1 when it is left unset.
_S3_CONFIG = BotoConfig(
    signature_version="s3v4", retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=60
)


_CONTROL_PLANE_CONFIG = BotoConfig(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=10)


def checkpoints_dir(cache: CacheConfig) -> Path | None:
    """Where the model cache puts checkpoints (the WebUI's checkpoint folder); None without a cache."""
    return cache.dir / KIND_DIRS["checkpoint"] if cache.source is not None else None


def build_backend(config: BackendConfig, *, models_dir: Path | None = None) -> Backend:
    """The backend of ``config``; ``models_dir`` is the model cache's checkpoint folder, which the
    in-process simulator lists as a WebUI would (the real ones are pointed at it by their flags)."""
    if config.kind == "simulated":
        from sdagent.backends.simulated import SimulatedBackend

        return SimulatedBackend(
            config.models, step_latency_s=config.step_latency_s, switch_latency_s=config.switch_latency_s,
            models_dir=models_dir,
        )  # fmt: skip
    if config.kind == "a1111":
        from sdagent.backends.a1111 import A1111Backend

        return A1111Backend(
            config.url, models=config.models, request_timeout_s=config.request_timeout_s,
            progress_poll_s=config.progress_poll_s,
        )
    from sdagent.backends.comfyui import ComfyUIBackend  # the only kind left in the schema

    return ComfyUIBackend(
        config.url, models=config.models, request_timeout_s=config.request_timeout_s,
        progress_poll_s=config.progress_poll_s, workflows_dir=config.workflows_dir,
    )


def build_supervisor(config: BackendConfig, backend: Backend) -> WebUISupervisor | None:
    """The WebUI's supervisor; None for the in-process simulated backend, which has no process."""
    if config.kind == "simulated":
        return None
    return WebUISupervisor.for_backend(config, backend)


def build_s3_client(config: OutputsConfig):
    return boto3.client("s3", region_name=config.region, endpoint_url=config.endpoint_url, config=_S3_CONFIG)


def build_inputs(s3_client) -> InputResolver:
    return InputResolver(s3_client)


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


def build_lifecycle(config: LifecycleConfig) -> LifecycleActions | None:
    """Lifecycle actions for the configured group, or None outside an Auto Scaling group."""
    if config.autoscaling_group is None:
        return None
    autoscaling = boto3.client(
        "autoscaling", region_name=config.region, endpoint_url=config.endpoint_url, config=_CONTROL_PLANE_CONFIG
    )
    return LifecycleActions(autoscaling)


def build_agent_metrics(settings: Settings, identity, on_gpu_lost) -> MetricsPublisher:
    """The metrics loop for this instance (not started); ``identity`` is IMDS's, or None off EC2."""
    from confluent_kafka.admin import AdminClient

    from sdagent.kafka.clients import admin_config
    from sdagent.metrics.assembly import build_metrics
    from sdagent.metrics.dimensions import InstanceIdentity

    region = settings.metrics.region or (identity.region if identity else None) or settings.outputs.region
    return build_metrics(
        settings.metrics,
        InstanceIdentity(settings.agent.instance_id, identity.instance_type if identity else None,
                         settings.lifecycle.autoscaling_group),
        region=region,
        kafka_admin=AdminClient(admin_config(settings.kafka)),
        jobs_topic=settings.topics.jobs,
        consumer_group=settings.kafka.group_id,
        on_gpu_lost=on_gpu_lost,
    )


def mark_unhealthy(settings: Settings) -> None:
    """Ask the Auto Scaling group to replace this instance (a lost GPU); outside a group, nothing."""
    if settings.lifecycle.autoscaling_group is None:
        return
    from sdagent.metrics.health import AutoScalingHealth

    autoscaling = boto3.client("autoscaling", region_name=settings.lifecycle.region,
                               endpoint_url=settings.lifecycle.endpoint_url, config=_CONTROL_PLANE_CONFIG)
    AutoScalingHealth(autoscaling).set_unhealthy(settings.agent.instance_id)

