"""The ``[agent]``, ``[retry]`` and ``[idempotency]`` sections: how the agent takes, runs and remembers jobs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RetryConfig(BaseModel):
    """Backoff for transient backend and upload failures; after ``max_attempts`` the job fails."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(4, ge=1, le=100)
    initial_backoff_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)


class IdempotencyConfig(BaseModel):
    """How long finished and cancelled job ids are remembered fleet-wide (docs/delivery.md)."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(3600.0, ge=60)
    # How long a redelivered job waits for this agent's view of the results topic to catch up.
    catch_up_timeout_s: float = Field(10.0, gt=0)


class AgentConfig(BaseModel):
    """How this agent takes and gives back jobs (``[agent]``)."""

    model_config = ConfigDict(extra="forbid")

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
    # A record whose path raises what the runner does not expect (a bug, a record shape nobody
    # foresaw) is tried this many times, its partition held back between tries with a backoff that
    # doubles from record_retry_backoff_s (other partitions go on), then dead-lettered and committed.
    record_attempts: int = Field(3, ge=1, le=20)
    record_retry_backoff_s: float = Field(1.0, gt=0, le=60)
