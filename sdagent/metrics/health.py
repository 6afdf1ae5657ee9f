"""Telling the Auto Scaling group this instance is broken (a lost GPU), so it is replaced."""

from __future__ import annotations

import structlog
from botocore.exceptions import BotoCoreError, ClientError

log = structlog.get_logger(__name__)


class AutoScalingHealth:
    """``SetInstanceHealth`` through an injected boto3 autoscaling client."""

    def __init__(self, autoscaling) -> None:
        self._autoscaling = autoscaling

    def set_unhealthy(self, instance_id: str) -> bool:
        """Mark the instance Unhealthy now; False (logged) when the group refused or was unreachable.

        ``ShouldRespectGracePeriod=False``: a lost GPU will not come back inside the health-check
        grace period, and a freshly booted instance that lost its GPU must be replaced too. The
        group then terminates the instance; its terminate lifecycle hook gives the agent time to
        release the job in flight.
        """
        try:
            self._autoscaling.set_instance_health(
                InstanceId=instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
            )
        except (ClientError, BotoCoreError) as exc:
            log.error("health.set_unhealthy_failed", instance_id=instance_id, error=str(exc))
            return False
        log.warning("health.set_unhealthy", instance_id=instance_id)
        return True
