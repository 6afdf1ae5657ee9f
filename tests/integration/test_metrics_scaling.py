"""The scaling and alarm expressions of cloudwatch/alarms.yaml, computed on what the agents publish.

moto stores the metrics and answers plain metric queries but evaluates no metric math and no
alarms. So each scenario publishes through the real sink, reads every plain query of a policy or
alarm back with get_metric_data, and evaluates the template's expression here, with a small
evaluator of the metric-math subset the template uses.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdagent.devstack.moto import DUMMY_CREDENTIALS, aws_client
from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.jobs import JobMetrics

yaml = pytest.importorskip("yaml")
TEMPLATE = Path(__file__).resolve().parents[2] / "cloudwatch" / "alarms.yaml"


# --- the template ------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !If...) as their long forms."""


def _cfn_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    else:
        value = loader.construct_sequence(node, deep=True)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def resolve(value, parameters: dict):
    """Replace {"Ref": parameter} with the parameter's value, everywhere in ``value``."""
    if isinstance(value, dict):
        if set(value) == {"Ref"} and value["Ref"] in parameters:
            return parameters[value["Ref"]]
        return {k: resolve(v, parameters) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, parameters) for v in value]
    return value


def queries_of(resource_name: str, parameters: dict) -> list[dict]:
    template = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)
    props = template["Resources"][resource_name]["Properties"]
    queries = props.get("Metrics") or props["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
    return resolve(queries, parameters)


# --- a metric-math evaluator for the subset the template uses -----------------------------------

Series = list  # values aligned on the evaluation's timestamps, None where a point is missing
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(==|!=|>=|<=|&&|\|\||[-+*/()\[\],<>]))")


class MetricMath:
    """Evaluates +, -, *, /, comparisons, AND/OR, IF, FILL(x, n|REPEAT), MAX/MIN([...]) point by point
    the way CloudWatch does: a missing operand makes the point missing; comparisons give 1 or 0."""

    def __init__(self, expression: str, series: dict[str, Series], length: int) -> None:
        self.tokens = self._tokenize(expression)
        self.position = 0
        self.series = series
        self.length = length

    def evaluate(self) -> Series:
        value = self._or()
        assert self.position == len(self.tokens), f"unparsed: {self.tokens[self.position :]}"
        return self._broadcast(value)

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        tokens, position = [], 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            assert match, f"cannot read {text[position:]!r}"
            tokens.append(next(group for group in match.groups() if group is not None))
            position = match.end()
        return tokens

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self.tokens[self.position]
        assert expected is None or token == expected, f"expected {expected}, got {token}"
        self.position += 1
        return token

    def _broadcast(self, value) -> Series:
        return value if isinstance(value, list) else [value] * self.length

    def _pointwise(self, function, *operands) -> Series:
        columns = [self._broadcast(operand) for operand in operands]
        return [None if any(v is None for v in values) else function(*values) for values in zip(*columns)]

    def _or(self):
        left = self._and()
        while self._peek() in ("OR", "||"):
            self._take()
            left = self._pointwise(lambda a, b: float(bool(a) or bool(b)), left, self._and())
        return left

    def _and(self):
        left = self._comparison()
        while self._peek() in ("AND", "&&"):
            self._take()
            left = self._pointwise(lambda a, b: float(bool(a) and bool(b)), left, self._comparison())
        return left

    _COMPARE = {
        ">": float.__gt__,
        "<": float.__lt__,
        ">=": float.__ge__,
        "<=": float.__le__,
        "==": float.__eq__,
        "!=": float.__ne__,
    }

    def _comparison(self):
        left = self._sum()
        while self._peek() in self._COMPARE:
            compare = self._COMPARE[self._take()]
            left = self._pointwise(lambda a, b, c=compare: float(c(float(a), float(b))), left, self._sum())
        return left

    def _sum(self):
        left = self._product()
        while self._peek() in ("+", "-"):
            op = self._take()
            right = self._product()
            left = self._pointwise((lambda a, b: a + b) if op == "+" else (lambda a, b: a - b), left, right)
        return left

    def _product(self):
        left = self._atom()
        while self._peek() in ("*", "/"):
            op = self._take()
            right = self._atom()
            left = self._pointwise(
                (lambda a, b: a * b) if op == "*" else (lambda a, b: a / b if b else None), left, right
            )
        return left

    def _atom(self):
        token = self._take()
        if token == "(":
            value = self._or()
            self._take(")")
            return value
        if re.fullmatch(r"\d+(\.\d+)?", token):
            return float(token)
        if self._peek() == "(":
            return self._call(token)
        if token == "REPEAT":
            return "REPEAT"
        return list(self.series[token])

    def _arguments(self) -> list:
        self._take("(")
        arguments = []
        while self._peek() != ")":
            if self._peek() == "[":
                self._take("[")
                items = [self._or()]
                while self._peek() == ",":
                    self._take(",")
                    items.append(self._or())
                self._take("]")
                arguments.append(items)
            else:
                arguments.append(self._or())
            if self._peek() == ",":
                self._take(",")
        self._take(")")
        return arguments

    def _call(self, name: str):
        arguments = self._arguments()
        if name == "FILL":
            series, fill = self._broadcast(arguments[0]), arguments[1]
            if fill == "REPEAT":
                filled, last = [], None
                for value in series:
                    last = value if value is not None else last
                    filled.append(last)
                return filled
            return [fill if value is None else value for value in series]
        if name in ("MAX", "MIN"):
            pick = max if name == "MAX" else min
            columns = [self._broadcast(item) for item in arguments[0]]
            return [
                pick(present) if (present := [v for v in values if v is not None]) else None for values in zip(*columns)
            ]
        if name == "IF":
            condition, yes, no = (self._broadcast(a) for a in arguments)
            return [None if c is None else (y if c else n) for c, y, n in zip(condition, yes, no)]
        raise AssertionError(f"the evaluator does not know {name}")


def test_the_evaluator_follows_cloudwatch_semantics():
    series = {"a": [1.0, None, 3.0], "b": [0.0, 2.0, None]}
    assert MetricMath("a + b", series, 3).evaluate() == [1.0, None, None]
    assert MetricMath("FILL(b, 0) + 1", series, 3).evaluate() == [1.0, 3.0, 1.0]
    assert MetricMath("FILL(a, REPEAT)", series, 3).evaluate() == [1.0, 1.0, 3.0]
    assert MetricMath("MAX([FILL(b, 0), 1])", series, 3).evaluate() == [1.0, 2.0, 1.0]
    assert MetricMath("IF(a > 0 AND FILL(b, 0) == 0, 1, 0)", series, 3).evaluate() == [1.0, None, 1.0]


# --- scenarios ---------------------------------------------------------------------------------


@pytest.fixture
def fleet(aws_endpoint):
    """A group name, topic and namespace of one test, with the sink and reader for them."""
    suffix = uuid.uuid4().hex[:8]
    namespace = f"SDAgentTest{suffix}"
    sink = CloudWatchSink(cloudwatch_client("us-east-1", aws_endpoint, **DUMMY_CREDENTIALS), namespace)
    return {
        "parameters": {
            "Namespace": namespace,
            "AutoScalingGroupName": f"fleet-{suffix}",
            "JobsTopic": f"jobs-{suffix}",
            "MetricPeriod": 60,
        },
        "sink": sink,
        "cloudwatch": aws_client("cloudwatch", aws_endpoint),
        # Whole minutes, in the past: every point of a scenario falls in its own 60 s period.
        "start": (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0),
    }


def publish_minute(
    fleet: dict, minute: int, *, backlog: float | None, in_service: float | None, busy: list[int]
) -> None:
    """One minute of the fleet: QueueBacklog from the partition-0 holder, each instance's JobsInFlight
    (through JobMetrics, as the agents do), and the group metric the Auto Scaling service publishes."""
    params = fleet["parameters"]
    stamp = (fleet["start"] + timedelta(minutes=minute)).timestamp()
    data: list[Datum] = []
    for index, in_flight in enumerate(busy):
        jobs = JobMetrics(jobs_topic=params["JobsTopic"])
        jobs.set_in_flight(in_flight)
        identity = InstanceIdentity(f"i-{index:017d}", "g5.xlarge", params["AutoScalingGroupName"])
        data.extend(jobs.collect(stamp, identity))
    if backlog is not None:
        data.append(Datum("QueueBacklog", (("JobsTopic", params["JobsTopic"]),), stamp, "Count", value=backlog))
    fleet["sink"].send(data)
    if in_service is not None:
        fleet["cloudwatch"].put_metric_data(
            Namespace="AWS/AutoScaling",
            MetricData=[
                {
                    "MetricName": "GroupInServiceInstances",
                    "Dimensions": [{"Name": "AutoScalingGroupName", "Value": params["AutoScalingGroupName"]}],
                    "Timestamp": datetime.fromtimestamp(stamp, UTC),
                    "Value": in_service,
                }
            ],
        )


def read_series(fleet: dict, queries: list[dict], stamps: list[datetime]) -> dict[str, Series]:
    """Every plain query's values on ``stamps`` (None where moto has no point)."""
    plain = [q for q in queries if "MetricStat" in q]
    result = fleet["cloudwatch"].get_metric_data(
        MetricDataQueries=[{"Id": q["Id"], "MetricStat": q["MetricStat"], "ReturnData": True} for q in plain],
        StartTime=stamps[0],
        EndTime=stamps[-1] + timedelta(minutes=1),
    )
    series = {}
    for data in result["MetricDataResults"]:
        points = {t.astimezone(UTC): v for t, v in zip(data["Timestamps"], data["Values"])}
        series[data["Id"]] = [points.get(stamp) for stamp in stamps]
    return series


def compute(queries: list[dict], series: dict[str, Series], length: int) -> list[float | None]:
    """The expressions in order (each may use those before it); the returned one's values."""
    series = dict(series)
    for q in queries:
        if "Expression" in q:
            series[q["Id"]] = MetricMath(q["Expression"], series, length).evaluate()
    (returned,) = [q["Id"] for q in queries if q.get("ReturnData", True)]
    return [None if v is None else round(v, 6) for v in series[returned]]


def evaluate(fleet: dict, resource: str, minutes: int) -> list[float | None]:
    """The resource's returned expression, one value per minute of the scenario."""
    queries = queries_of(resource, fleet["parameters"])
    stamps = [fleet["start"] + timedelta(minutes=m) for m in range(minutes)]
    return compute(queries, read_series(fleet, queries, stamps), len(stamps))


def test_jobs_per_instance_drives_target_tracking_and_step_scale_out(fleet):
    # QueueBacklog is the group's lag: it includes the jobs agents are running (committed after
    # their answer), so "waiting" is the lag minus the jobs in flight.
    publish_minute(fleet, 0, backlog=0, in_service=0, busy=[])  # idle at zero
    publish_minute(fleet, 1, backlog=12, in_service=0, busy=[])  # jobs arrive, nothing in service
    publish_minute(fleet, 2, backlog=10, in_service=2, busy=[1, 1])  # 8 waiting, 2 running
    publish_minute(fleet, 3, backlog=1, in_service=2, busy=[1, 0])  # nothing waiting, one running
    publish_minute(fleet, 4, backlog=40, in_service=None, busy=[1, 1])  # group metric late: repeated
    publish_minute(fleet, 5, backlog=0, in_service=2, busy=[1, 1])  # lag read before a start: not negative
    expected = [0.0, 12.0, 5.0, 0.5, 20.0, 1.0]  # (waiting + in flight) / max(in service, 1)
    assert evaluate(fleet, "BacklogTargetTracking", 6) == expected
    assert evaluate(fleet, "SustainedBacklogAlarm", 6) == expected
    # With the default step threshold (10): minutes 1 and 4 breach the sustained-backlog alarm.
    assert [v > 10 for v in expected] == [False, True, False, False, True, False]


def test_scale_from_zero_fires_only_with_jobs_waiting_and_nothing_in_service(fleet):
    publish_minute(fleet, 0, backlog=0, in_service=0, busy=[])
    publish_minute(fleet, 1, backlog=5, in_service=0, busy=[])
    publish_minute(fleet, 2, backlog=5, in_service=1, busy=[0])  # an instance came in: stop adding
    publish_minute(fleet, 3, backlog=None, in_service=0, busy=[])  # nobody publishes the backlog
    assert evaluate(fleet, "BacklogWithoutCapacityAlarm", 4) == [0.0, 1.0, 0.0, None]


def test_scale_in_counts_only_idle_instances_and_only_when_no_job_waits(fleet):
    publish_minute(fleet, 0, backlog=3, in_service=3, busy=[1, 1, 1])  # all busy: nothing to remove
    publish_minute(fleet, 1, backlog=1, in_service=3, busy=[1, 0, 0])  # two idle, none waiting
    publish_minute(fleet, 2, backlog=5, in_service=3, busy=[1, 0, 0])  # four waiting: keep them all
    publish_minute(fleet, 3, backlog=0, in_service=3, busy=[0, 0, 0])  # all idle
    publish_minute(fleet, 4, backlog=None, in_service=3, busy=[0, 0, 0])  # no queue signal: keep
    assert evaluate(fleet, "IdleCapacityAlarm", 5) == [0.0, 2.0, 0.0, 3.0, None]


def test_high_resolution_periods_repeat_the_one_minute_group_metric(fleet):
    params = {**fleet["parameters"], "MetricPeriod": 10}
    fleet["parameters"] = params
    sink = CloudWatchSink(fleet["sink"]._client, params["Namespace"], storage_resolution=1)
    start = fleet["start"]
    jobs = JobMetrics(jobs_topic=params["JobsTopic"])
    identity = InstanceIdentity("i-00000000000000001", "g5.xlarge", params["AutoScalingGroupName"])
    jobs.set_in_flight(1)
    for second in range(0, 60, 10):  # one agent busy all along, publishing every 10 s
        stamp = (start + timedelta(seconds=second)).timestamp()
        sink.send(
            [
                Datum("QueueBacklog", (("JobsTopic", params["JobsTopic"]),), stamp, "Count", value=9.0),
                *jobs.collect(stamp, identity),
            ]
        )
    publish_minute(fleet, 0, backlog=None, in_service=2, busy=[])  # the group metric: once a minute
    queries = queries_of("BacklogTargetTracking", params)
    stamps = [start + timedelta(seconds=s) for s in range(0, 60, 10)]
    series = read_series(fleet, queries, stamps)
    assert series["inservice"][1:] == [None] * 5  # only the first 10 s period has the group metric
    # 9 unfinished jobs (lag) over 2 instances in every period; one agent busy = 2 in flight
    # estimated (average 1 per agent x 2 in service), less than the lag: 9 / 2.
    assert compute(queries, series, len(stamps)) == [4.5] * 6
