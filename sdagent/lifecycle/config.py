"""The ``[lifecycle]`` and ``[imds]`` sections: the Auto Scaling group, its hooks, and IMDS watching."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LifecycleConfig(BaseModel):
    """The instance's Auto Scaling group and lifecycle hooks (``[lifecycle]``); all optional."""

    model_config = ConfigDict(extra="forbid")

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


class ImdsConfig(BaseModel):
    """Watching the instance metadata service for spot, rebalance, lifecycle and maintenance notices."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # AWS suggests 5 s; aws-node-termination-handler polls every 2 s. A poll is one local request.
    interval_s: float = Field(2.0, gt=0, le=60)
    # Rebalance recommendation: "drain" leaves early; "hold" takes no new job for rebalance_hold_s
    # and then resumes if no interruption followed.
    rebalance: Literal["drain", "hold"] = "hold"
    rebalance_hold_s: float = Field(600.0, gt=0)
