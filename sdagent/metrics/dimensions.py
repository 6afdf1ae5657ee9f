"""Who is publishing: the instance's identity and the dimension sets built from it.

The identity comes from IMDS (``sdagent/imds.py``) through the agent; nothing here asks IMDS itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdagent.metrics import names
from sdagent.metrics.datum import Dimensions


@dataclass(frozen=True)
class InstanceIdentity:
    """The instance the metrics describe; ``autoscaling_group`` is None outside a group (a laptop)."""

    instance_id: str
    instance_type: str | None = None
    autoscaling_group: str | None = None

    def instance(self) -> Dimensions:
        dims = [(names.INSTANCE_ID, self.instance_id)]
        if self.instance_type:
            dims.append((names.INSTANCE_TYPE, self.instance_type))
        if self.autoscaling_group:
            dims.append((names.AUTOSCALING_GROUP, self.autoscaling_group))
        return tuple(dims)

    def gpu(self, index: int) -> Dimensions:
        return (*self.instance(), (names.GPU_INDEX, str(index)))

    def group(self) -> Dimensions | None:
        """The fleet-wide set, or None when the instance is in no group (nothing to aggregate into)."""
        if not self.autoscaling_group:
            return None
        return ((names.AUTOSCALING_GROUP, self.autoscaling_group),)


def topic(jobs_topic: str) -> Dimensions:
    return ((names.JOBS_TOPIC, jobs_topic),)
