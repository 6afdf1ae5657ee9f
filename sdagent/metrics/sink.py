"""The sink interface: where data points go. One file per implementation (``cloudwatch.py``, ``emf.py``)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from sdagent.errors import SdagentError
from sdagent.metrics.datum import Datum


class SinkUnavailable(SdagentError):
    """Raised when a sink cannot take data now (network, throttling past retries, 5xx); retry later.

    ``consumed`` leading data points of the batch were dealt with before the failure and must not be
    sent again: ``delivered`` of them accepted, the rest refused for good.
    """

    def __init__(self, message: str, consumed: int = 0, delivered: int | None = None) -> None:
        super().__init__(message)
        self.consumed = consumed
        self.delivered = consumed if delivered is None else delivered


@dataclass(frozen=True)
class SendResult:
    """``delivered`` data points were accepted; ``rejected`` were refused for good (bad values) and dropped."""

    delivered: int
    rejected: int = 0
    requests: int = 0


class MetricsSink(abc.ABC):
    """Takes batches of data points in order; called from the publisher thread only."""

    @abc.abstractmethod
    def send(self, data: Sequence[Datum]) -> SendResult:
        """Deliver ``data``; raise :class:`SinkUnavailable` when it should be retried later."""

    def close(self) -> None:  # noqa: B027 - most sinks hold nothing to release
        """Release connections or files."""
