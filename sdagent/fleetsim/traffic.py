"""Arrivals, second by second: how many jobs, when in the second, of which kind, model and caller."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdagent.fleetsim.scenario import Component, Diurnal, Jobs, Steady, StepChange, Tenants, Traffic


@dataclass(frozen=True)
class Arrivals:
    """The jobs offered in one second, in arrival order."""

    at: np.ndarray  # seconds since the start
    kind: np.ndarray  # index into the scenario's job kinds
    service_s: np.ndarray  # generation time on the reference GPU
    model: np.ndarray  # 0 is the most popular
    sync: np.ndarray  # bool: the caller waits on the answer


class Offered:
    """The offered load: the rate of each second (components added) and the jobs drawn from it."""

    def __init__(self, traffic: Traffic, jobs: Jobs, rng: np.random.Generator) -> None:
        self._traffic = traffic
        self._rng = rng
        self._tenants = {i: _TenantStates(c, rng) for i, c in enumerate(traffic.components) if isinstance(c, Tenants)}
        self._kind_cdf = np.cumsum([k.share for k in jobs.kinds])
        self._kind_cdf[-1] = 1.0
        sigma2 = np.array([math.log(1 + k.cv**2) for k in jobs.kinds])
        self._mu = np.log([k.seconds for k in jobs.kinds]) - sigma2 / 2
        self._sigma = np.sqrt(sigma2)
        weights = 1.0 / np.arange(1, jobs.models.count + 1) ** jobs.models.zipf_s
        self._model_cdf = np.cumsum(weights / weights.sum())
        self._model_cdf[-1] = 1.0

    @property
    def model_popularity(self) -> np.ndarray:
        return np.diff(self._model_cdf, prepend=0.0)

    def rate(self, second: int) -> float:
        return sum(self._component_rate(i, c, second) for i, c in enumerate(self._traffic.components))

    def draw(self, second: int) -> Arrivals:
        rng = self._rng
        count = int(rng.poisson(self.rate(second)))
        kind = np.searchsorted(self._kind_cdf, rng.random(count), side="right")
        return Arrivals(
            at=second + np.sort(rng.random(count)),
            kind=kind,
            service_s=rng.lognormal(self._mu[kind], self._sigma[kind]),
            model=np.searchsorted(self._model_cdf, rng.random(count), side="right"),
            sync=rng.random(count) < self._traffic.sync_share,
        )

    def _component_rate(self, index: int, component: Component, second: int) -> float:
        if isinstance(component, Steady):
            return component.rate
        if isinstance(component, StepChange):
            if second < component.at_s:
                return component.before
            done = 1.0 if component.ramp_s == 0 else min(1.0, (second - component.at_s) / component.ramp_s)
            return component.before + (component.after - component.before) * done
        if isinstance(component, Diurnal):
            hour = (second / 3600) % 24
            return component.mean * (
                1 + component.amplitude * math.cos(2 * math.pi * (hour - component.peak_hour) / 24)
            )
        return self._tenants[index].rate_at(second)


class _TenantStates:
    """Each tenant on or off, switching after exponential spells; asked once per second, in order."""

    def __init__(self, tenants: Tenants, rng: np.random.Generator) -> None:
        self._tenants = tenants
        self._rng = rng
        self._on = rng.random(tenants.count) < tenants.on_s / (tenants.on_s + tenants.off_s)
        self._second = -1
        self._rate = 0.0

    def rate_at(self, second: int) -> float:
        if second != self._second:
            self._second = second
            stay_on = math.exp(-1 / self._tenants.on_s)
            stay_off = math.exp(-1 / self._tenants.off_s)
            flip = self._rng.random(self._tenants.count) > np.where(self._on, stay_on, stay_off)
            self._on ^= flip
            self._rate = float(self._on.sum()) * self._tenants.rate
        return self._rate
