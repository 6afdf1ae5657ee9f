"""Injected failures of the simulated WebUI: what can go wrong, and which request meets it.

A fault is armed at start-up (``--fault``) or at runtime (``POST /sim/faults``) and fires on the
next ``count`` matching requests. Two families exist, checked at different points:

* HTTP faults (``error``, ``slow``) are applied by the server's middleware before a handler runs,
  to generation requests only (A1111 ``txt2img``/``img2img``, ComfyUI ``POST /prompt``) unless the
  fault's scope is ``all``, which models a WebUI whose whole HTTP server is wedged.
* Generation faults (``hang``, ``crash``, ``oom``, ``ws_drop``) are taken when a generation begins
  and act while it samples, the way a real GPU fails: mid-job, with the HTTP server still up.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import asdict, dataclass, field
from typing import Any

UNLIMITED = -1  # a fault count that never runs out; cleared only by DELETE /sim/faults


class FaultKind(str, enum.Enum):
    ERROR = "error"  # a 5xx answer in the API's own error shape instead of the handler's
    SLOW = "slow"  # the answer is delayed by delay_s, then handled normally
    HANG = "hang"  # sampling never progresses until the generation is interrupted
    CRASH = "crash"  # the process exits hard after the first sampling step
    OOM = "oom"  # sampling fails with CUDA out of memory, in the API's own error shape
    WS_DROP = "ws_drop"  # ComfyUI's websocket is cut at the first progress message


HTTP_KINDS = frozenset({FaultKind.ERROR, FaultKind.SLOW})
GENERATION_KINDS = frozenset({FaultKind.HANG, FaultKind.CRASH, FaultKind.OOM, FaultKind.WS_DROP})


class Api(str, enum.Enum):
    A1111 = "a1111"
    COMFYUI = "comfyui"


class Scope(str, enum.Enum):
    GENERATION = "generation"  # only requests that start a generation
    ALL = "all"  # every request except the simulator's own /sim routes


@dataclass
class Fault:
    """One armed failure; ``count`` is how many more matching requests meet it."""

    kind: FaultKind
    count: int = 1
    api: Api | None = None  # None: either API
    scope: Scope = Scope.GENERATION  # HTTP faults only
    status: int = 500  # error only
    delay_s: float = 5.0  # slow only

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        self.scope = Scope(self.scope)
        if self.api is not None:
            self.api = Api(self.api)
        if self.count < 1 and self.count != UNLIMITED:
            raise ValueError(f"count must be >= 1 or {UNLIMITED} (unlimited), got {self.count}")
        if not 500 <= self.status <= 599:
            raise ValueError(f"status must be a 5xx code, got {self.status}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        if self.kind is FaultKind.WS_DROP and self.api is Api.A1111:
            raise ValueError("ws_drop only applies to ComfyUI: A1111 has no websocket")

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Fault:
        """Build a fault from the JSON body of ``POST /sim/faults``; raises ValueError."""
        unknown = set(document) - {"kind", "count", "api", "scope", "status", "delay_s"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in document:
            raise ValueError(f"kind is required, one of {[kind.value for kind in FaultKind]}")
        try:
            return cls(
                kind=FaultKind(document["kind"]),
                count=int(document.get("count", 1)),
                api=document.get("api"),
                scope=document.get("scope", Scope.GENERATION),
                status=int(document.get("status", 500)),
                delay_s=float(document.get("delay_s", 5.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse a command-line spec ``KIND[:COUNT][:KEY=VALUE,...]``, e.g. ``error:2:status=503``."""
        kind, _, rest = spec.partition(":")
        count, _, options = rest.partition(":")
        document: dict[str, Any] = {"kind": kind}
        if count:
            document["count"] = count
        for pair in filter(None, options.split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"fault option {pair!r} is not KEY=VALUE")
            document[key] = value
        return cls.from_dict(document)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document.update(kind=self.kind.value, scope=self.scope.value, api=self.api.value if self.api else None)
        return document

    def matches(self, api: Api) -> bool:
        return self.api is None or self.api is api


@dataclass
class FaultPlan:
    """The armed faults, first armed first fired. Used from the event loop only: no lock."""

    _armed: list[Fault] = field(default_factory=list)
    fired: collections.Counter[str] = field(default_factory=collections.Counter)

    def arm(self, fault: Fault) -> None:
        self._armed.append(fault)

    def clear(self) -> None:
        self._armed.clear()

    def armed(self) -> list[dict[str, Any]]:
        return [fault.to_dict() for fault in self._armed]

    def take_http(self, api: Api, *, starts_generation: bool) -> Fault | None:
        """The HTTP fault this request meets, if any; counts it as fired."""
        return self._take(
            lambda fault: (
                fault.kind in HTTP_KINDS and fault.matches(api) and (starts_generation or fault.scope is Scope.ALL)
            )
        )

    def take_generation(self, api: Api) -> Fault | None:
        """The generation fault a generation starting now meets, if any; counts it as fired."""
        return self._take(
            lambda fault: (
                fault.kind in GENERATION_KINDS
                and fault.matches(api)
                and (fault.kind is not FaultKind.WS_DROP or api is Api.COMFYUI)
            )
        )

    def _take(self, wanted: Any) -> Fault | None:
        for fault in self._armed:
            if wanted(fault):
                if fault.count != UNLIMITED:
                    fault.count -= 1
                    if fault.count == 0:
                        self._armed.remove(fault)
                self.fired[fault.kind.value] += 1
                return fault
        return None
