"""A scenario file: the traffic, the jobs, the instances' life, the intake, the prices.

Validated with pydantic, so a scenario with a wrong key or value is refused naming it. Every
default is a figure the project measured or documented, named where it comes from; the scaling
policy is not here at all: it is read from the templates the scenario points at.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROOT = Path(__file__).resolve().parents[2]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Steady(_Strict):
    kind: Literal["steady"]
    rate: float = Field(ge=0)  # jobs/s


class StepChange(_Strict):
    """From ``before`` to ``after`` jobs/s, linearly over ``ramp_s`` from ``at_s``."""

    kind: Literal["step"]
    before: float = Field(ge=0)
    after: float = Field(ge=0)
    at_s: float = Field(ge=0)
    ramp_s: float = Field(default=60, ge=0)


class Diurnal(_Strict):
    """A day's cycle: ``mean`` jobs/s, swinging by ``amplitude`` of it, highest at ``peak_hour``."""

    kind: Literal["diurnal"]
    mean: float = Field(ge=0)
    amplitude: float = Field(ge=0, le=1)
    peak_hour: float = Field(default=15, ge=0, lt=24)


class Tenants(_Strict):
    """``count`` tenants, each on (``rate`` jobs/s) or off, for exponential spells of the means."""

    kind: Literal["tenants"]
    count: int = Field(ge=1, le=10_000)
    rate: float = Field(ge=0)
    on_s: float = Field(gt=0)
    off_s: float = Field(gt=0)


Component = Annotated[Steady | StepChange | Diurnal | Tenants, Field(discriminator="kind")]


class Traffic(_Strict):
    components: tuple[Component, ...] = Field(min_length=1)  # their rates add up
    sync_share: float = Field(default=0.5, ge=0, le=1)  # callers waiting on the answer
    sync_timeout_s: float = Field(default=30, gt=0)  # the gateway's wait before it answers 202/504


class JobKind(_Strict):
    name: str
    share: float = Field(gt=0, le=1)
    seconds: float = Field(gt=0)  # mean generation time on the reference GPU (speed 1.0)
    cv: float = Field(default=0.25, ge=0, le=3)  # lognormal coefficient of variation


class Models(_Strict):
    """``count`` checkpoints drawn with Zipf popularity; a share of them are SDXL-sized."""

    count: int = Field(default=20, ge=1, le=100_000)
    zipf_s: float = Field(default=1.1, gt=0)
    small_gb: float = Field(default=2.1, gt=0)  # SD 1.5 fp16
    large_gb: float = Field(default=6.9, gt=0)  # SDXL fp16
    large_share: float = Field(default=0.3, ge=0, le=1)


class Jobs(_Strict):
    kinds: tuple[JobKind, ...] = Field(min_length=1)
    models: Models = Models()

    @model_validator(mode="after")
    def _shares_add_up(self) -> Jobs:
        total = sum(k.share for k in self.kinds)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"jobs.kinds shares add up to {total:g}, not 1")
        return self


class Instance(_Strict):
    """One instance's life; the estimates of docs/boot-budget.md unless measured."""

    ec2_launch_s: float = Field(default=18, ge=0)  # the brief's measurement
    boot_s: float = Field(default=30, ge=0)  # firmware, kernel, systemd, driver, NVMe, agent start
    webui_start_s: float = Field(default=18, ge=0)  # in parallel with the prewarm
    ebs_first_touch_s: float = Field(default=25, ge=0)  # lazily loaded root volume, skipped from a warm pool
    warm_start_s: float = Field(default=12, ge=0)  # an EC2 start of a stopped warm-pool instance
    prewarm_models: int = Field(default=1, ge=0)  # the most popular ones, staged before READY
    stage_mb_s: float = Field(default=700, gt=0)  # store to NVMe (bench/cache_staging.py scale)
    load_gb_s: float = Field(default=1.5, gt=0)  # NVMe to GPU memory
    switch_fixed_s: float = Field(default=1.0, ge=0)  # unload, build the pipeline
    cache_gb: float = Field(default=200, gt=0)  # NVMe cache for models
    drain_timeout_s: float = Field(default=90, gt=0)  # agent.drain_timeout_s
    drain_margin_s: float = Field(default=15, ge=0)  # agent.drain_margin_s
    protect_idle_s: float = Field(default=30, ge=0)  # scale-in protection lifted after this idle
    dispatch_s: float = Field(default=0.004, ge=0)  # intake to backend, per job (bench/pipeline.py)


class Spot(_Strict):
    interruptions_per_hour: float = Field(default=0.0, ge=0, le=1)  # share of instances per hour
    notice_s: float = Field(default=120, gt=0)
    rebalance_share: float = Field(default=0.5, ge=0, le=1)  # interruptions announced by a recommendation
    rebalance_lead_s: float = Field(default=300, ge=0)  # that long before the notice
    on_rebalance: Literal["hold", "drain"] = "hold"  # imds.rebalance, the agent's default
    rebalance_hold_s: float = Field(default=600, ge=0)  # imds.rebalance_hold_s


class Intake(_Strict):
    mode: Literal["share", "partition"] = "share"
    partitions: int = Field(default=64, ge=1, le=10_000)  # the jobs topic's (partition mode)
    routing: Literal["keyed", "least_loaded"] = "keyed"  # partition mode's placement
    routing_choices: int = Field(default=2, ge=0)  # 0: every agent
    affinity: bool = False  # share mode: an idle agent holding the job's model takes it first
    affinity_max_wait_s: float = Field(default=2.0, ge=0)  # past this, the oldest job goes first
    rebalance_pause_s: float = Field(default=3, ge=0)  # moved partitions idle this long
    release_s: float = Field(default=0.43, ge=0)  # a released record reaches another consumer (share)


class CloudWatch(_Strict):
    ingestion_delay_s: float = Field(default=60, ge=0)  # a minute's datapoint is seen this late
    scale_out_datapoints: int = Field(default=3, ge=1)  # target tracking's high alarm (AWS: 3 of 3)
    scale_in_datapoints: int = Field(default=15, ge=1)  # its low alarm (AWS: 15 of 15)
    scale_in_threshold: float = Field(default=0.9, gt=0, le=1)  # low alarm at this share of the target
    scale_in_max_share: float = Field(default=0.1, gt=0, le=1)  # at most this much capacity per scale-in
    share_backlog_published: bool = True  # see docs/fleet-simulation.md: not yet true of the agent


class InstanceType(_Strict):
    on_demand: float = Field(gt=0)  # $ per hour
    spot: float | None = Field(default=None, gt=0)
    speed: float = Field(default=1.0, gt=0)  # generation time on the reference GPU / on this one


class Prices(_Strict):
    as_of: date
    region: str = "us-east-1"
    spot_type: str = "g5.xlarge"  # what the Spot group launches
    base_type: str | None = None  # the base group's; default the template's BaseInstanceType
    ebs_gb_month: float = Field(default=0.08, ge=0)  # gp3, for stopped warm-pool instances
    root_gb: float = Field(default=200, gt=0)
    types: dict[str, InstanceType] = Field(min_length=1)

    @model_validator(mode="after")
    def _types_known(self) -> Prices:
        for name in (self.spot_type, self.base_type):
            if name is not None and name not in self.types:
                raise ValueError(f"prices.types has no {name!r}")
        if self.types[self.spot_type].spot is None:
            raise ValueError(f"prices.types.{self.spot_type} has no spot price")
        return self


class TemplateRef(_Strict):
    path: Path
    parameters: dict[str, Any] = {}


class Templates(_Strict):
    fleet: TemplateRef = TemplateRef(path=Path("fleet/fleet.yaml"))
    alarms: TemplateRef | None = None  # cloudwatch/alarms.yaml deployed on each group as well


class Scenario(_Strict):
    name: str
    duration_s: float = Field(gt=0, le=7 * 86_400)
    seed: int = 1
    start_instances: int = Field(default=0, ge=0)  # READY at t=0 in the Spot group (desired too)
    templates: Templates = Templates()
    traffic: Traffic
    jobs: Jobs
    instance: Instance = Instance()
    spot: Spot = Spot()
    intake: Intake = Intake()
    cloudwatch: CloudWatch = CloudWatch()
    prices: Prices
    latency_goal_s: float = Field(default=4.0, gt=0)  # the p99 the answers are about


def load(path: Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """The scenario in ``path``; ``overrides`` (dotted keys) replace what it says."""
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a scenario is a mapping")
    for dotted, value in (overrides or {}).items():
        _set(raw, dotted.split("."), value)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path}: {_first_problem(error)}") from None


def resolve(path: Path) -> Path:
    """A template path from a scenario: as given if it exists, else from the project's root."""
    return path if path.is_absolute() or path.exists() else ROOT / path


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else problem["msg"]
