"""What each agent says of itself on the compacted agents topic, keyed by its instance id.

Written by the agent's beacon (``sdagent.agent.beacon``), read by load-aware submitters
(``sdagent.kafka.routing``) and by operators (``kcat -C -t sdagent.agents -K: -e``). The latest
record per key is the agent's state; a tombstone (null value) says it left. Readers ignore fields
they do not know, so a newer agent can say more without breaking an older reader.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1


class AgentRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    instance_id: str = Field(min_length=1, max_length=256)
    loaded_model: str | None = None
    # Share mode with model topics: the model whose topic it reads, and has long enough to take a
    # job routed there at once. What ModelTopicPlacement routes by (loaded_model may be newer).
    hot_model: str | None = None
    cached_models: list[str] = Field(default_factory=list)
    # The jobs topic's partitions the agent holds (partition-bound consumption; empty in a share group).
    jobs_partitions: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=10_000)
    queued: int = Field(0, ge=0)  # jobs it holds: read ahead and running
    # About how long until it could start one more job: the running job's time left and the
    # held jobs at its average run time (mean_job_s). What load-aware routing compares.
    backlog_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    mean_job_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    mean_switch_s: float = Field(0.0, ge=0, allow_inf_nan=False)  # its model switches' moving average
    accepting: bool = True  # false while held (draining, backend down, warm pool): route elsewhere
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> AgentRecord:
        """Raises ValueError for anything that is not an agent record (the topic is shared)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"not an agent record: {exc.error_count()} error(s)") from exc
