"""Load-aware placement: the two-choice pick over the agents' beacons, and the beacon itself."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from sdagent.agent.beacon import MIN_GAP_S, AgentBeacon, AgentState
from sdagent.agent.slot import Load
from sdagent.jobs import Job
from sdagent.kafka.agents import AgentRecord
from sdagent.kafka.config import KafkaConfig, TopicsConfig
from sdagent.kafka.routing import KEYED, STALE_AFTER_S, AgentLoads, KeyedPlacement, placement_for

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def record(
    name: str,
    queued: int,
    partitions: list[int],
    *,
    age_s: float = 0.0,
    accepting: bool = True,
    backlog_s: float | None = None,
    mean_job_s: float = 0.3,
) -> AgentRecord:
    backlog_s = queued * mean_job_s if backlog_s is None else backlog_s
    return AgentRecord(instance_id=name, queued=queued, jobs_partitions=partitions, accepting=accepting,
                       at=NOW - timedelta(seconds=age_s), backlog_s=backlog_s, mean_job_s=mean_job_s)  # fmt: skip


def loads(*records: AgentRecord, partitions: int = 12, seed: int = 1) -> AgentLoads:
    view = AgentLoads(rng=random.Random(seed), now=lambda: NOW)
    view.set_partition_count(partitions)
    for r in records:
        view.update(r.instance_id, r)
    return view


def test_with_two_agents_every_job_goes_to_the_less_loaded_until_the_loads_meet():
    view = loads(record("busy", 5, [0, 1]), record("idle", 0, [2, 3]))
    picks = [view.pick() for _ in range(5)]
    assert all(p in (2, 3) for p in picks)  # the idle agent's load rises by one per job sent
    assert view.pick() in (0, 1, 2, 3)  # 5 against 5: either


def test_time_left_counts_before_the_number_of_jobs():
    # One long job (6 s left) against three short ones (0.9 s): the short queue is sooner free.
    view = loads(
        record("long", 1, [0], backlog_s=6.0, mean_job_s=6.0), record("short", 3, [1], backlog_s=0.9, mean_job_s=0.3)
    )
    picks = [view.pick() for _ in range(10)]
    assert picks.count(1) >= 9  # short's estimate grows 0.3 s a job: 6 s is 17 jobs away


def test_a_fresh_beacon_replaces_what_was_counted_locally():
    view = loads(record("a", 0, [0]), record("b", 0, [1]))
    for _ in range(10):
        view.pick()
    view.update("a", record("a", 0, [0]))  # a ran them all already
    view.update("b", record("b", 9, [1]))
    assert view.pick() == 0


def test_two_choices_spread_jobs_over_many_idle_agents():
    view = loads(*(record(f"agent-{i}", 0, [i]) for i in range(12)))
    picks = [view.pick() for _ in range(120)]
    assert max(picks.count(p) for p in range(12)) <= 12  # even: 10 each, give or take two


@pytest.mark.parametrize(
    ("why", "agent"),
    [
        ("stale", record("x", 0, [0], age_s=STALE_AFTER_S + 1)),
        ("dated in the future beyond clock skew", record("x", 0, [0], age_s=-(STALE_AFTER_S + 1))),
        ("held (draining, backend down)", record("x", 0, [0], accepting=False)),
        ("no partition", record("x", 0, [])),
        ("partitions the topic does not have", record("x", 0, [12, 40])),
    ],
)
def test_an_agent_that_cannot_take_a_routed_job_is_never_picked(why, agent):
    assert loads(agent).pick() == KEYED, why
    assert loads(agent, record("ok", 50, [3])).pick() == 3, why


def test_nothing_is_routed_before_the_topic_is_known_or_after_every_agent_left():
    view = AgentLoads(now=lambda: NOW)
    view.update("a", record("a", 0, [0]))
    assert view.pick() == KEYED  # partition count unknown
    view.set_partition_count(4)
    assert view.pick() == 0
    view.update("a", None)  # tombstone
    assert view.pick() == KEYED


def test_a_partition_past_the_topic_is_never_chosen_even_beside_a_valid_one():
    view = loads(record("a", 0, [1, 99]), partitions=4)
    assert {view.pick() for _ in range(20)} == {1}


def test_agent_records_refuse_junk_and_ignore_fields_they_do_not_know():
    with pytest.raises(ValueError, match="not an agent record"):
        AgentRecord.from_bytes(b'{"instance_id": "", "queued": -1}')
    with pytest.raises(ValueError, match="not an agent record"):
        AgentRecord.from_bytes(b"\xff not json")
    with pytest.raises(ValueError, match="not an agent record"):
        AgentRecord.from_bytes(b'{"instance_id": "a", "jobs_partitions": [-1]}')
    newer = AgentRecord.from_bytes(b'{"instance_id": "a", "queued": 2, "gpu": "L4"}')
    assert (newer.instance_id, newer.queued) == ("a", 2)


def test_placement_is_keyed_unless_least_loaded_in_partition_mode():
    jobs_routed = TopicsConfig(jobs_routing="least_loaded")
    assert isinstance(placement_for(KafkaConfig(), TopicsConfig()), KeyedPlacement)
    assert isinstance(placement_for(KafkaConfig(consumption="share"), jobs_routed), KeyedPlacement)
    topics = TopicsConfig()
    assert KeyedPlacement(topics).place(Job(model="m")) == (topics.jobs, KEYED)
    assert KeyedPlacement(topics).place(Job(model="m", priority=1)) == (topics.priority_jobs, KEYED)


def test_routing_by_load_and_keying_by_model_are_refused_together():
    with pytest.raises(ValueError, match="jobs_routing = least_loaded .* jobs_key = model"):
        TopicsConfig(jobs_routing="least_loaded", jobs_key="model")


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[bytes | None] = []
        self.fail = False

    def produce(self, topic, key=None, value=None):
        if self.fail:
            raise BufferError("queue full")
        self.sent.append(value)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state(queued: int = 0, model: str | None = "m", partitions: frozenset[int] = frozenset({0}), accepting=True):
    return AgentState(model, Load(queued, queued * 0.5, 0.5), partitions, accepting)


def beacon(producer: FakeProducer, clock: Clock, listed: list[int]) -> AgentBeacon:
    def cached() -> list[str]:
        listed.append(1)
        return ["m"]

    return AgentBeacon(producer, "agents", "agent-1", cached, interval_s=1.0, clock=clock)  # type: ignore[arg-type]


def test_the_beacon_sends_on_a_change_at_once_and_every_interval_otherwise():
    producer, clock, listed = FakeProducer(), Clock(), []
    b = beacon(producer, clock, listed)
    b.follow(state())
    b.follow(state())
    assert len(producer.sent) == 1
    b.follow(state(partitions=frozenset({0, 1})))  # a rebalance: at once
    b.follow(state(partitions=frozenset({0, 1}), accepting=False))  # held: at once
    assert len(producer.sent) == 3
    clock.now = 1.0
    b.follow(state(partitions=frozenset({0, 1}), accepting=False))  # nothing changed, interval up
    assert len(producer.sent) == 4
    last = AgentRecord.from_bytes(producer.sent[-1] or b"")
    assert (last.jobs_partitions, last.accepting, last.cached_models) == ([0, 1], False, ["m"])


def test_a_change_of_the_job_count_alone_waits_for_the_minimum_gap():
    producer, clock, listed = FakeProducer(), Clock(), []
    b = beacon(producer, clock, listed)
    b.follow(state(queued=0))
    clock.now = MIN_GAP_S / 2
    b.follow(state(queued=1))
    assert len(producer.sent) == 1
    clock.now = MIN_GAP_S
    b.follow(state(queued=1))
    assert len(producer.sent) == 2
    sent = AgentRecord.from_bytes(producer.sent[-1] or b"")
    assert (sent.queued, sent.backlog_s, sent.mean_job_s) == (1, 0.5, 0.5)


def test_a_jump_of_the_time_until_free_is_sent_a_small_drift_is_not():
    producer, clock, listed = FakeProducer(), Clock(), []
    b = beacon(producer, clock, listed)
    b.follow(AgentState("m", Load(1, 0.3, 0.3), frozenset({0}), True))
    clock.now = MIN_GAP_S
    b.follow(AgentState("m", Load(1, 0.5, 0.3), frozenset({0}), True))  # drift: within the interval
    assert len(producer.sent) == 1
    b.follow(AgentState("m", Load(1, 6.0, 0.3), frozenset({0}), True))  # a long job showed its length
    assert len(producer.sent) == 2
    assert AgentRecord.from_bytes(producer.sent[-1] or b"").backlog_s == 6.0


def test_the_cache_is_listed_on_a_model_change_not_on_every_record():
    producer, clock, listed = FakeProducer(), Clock(), []
    b = beacon(producer, clock, listed)
    for second in range(5):
        clock.now = float(second)
        b.follow(state())
    assert len(producer.sent) == 5 and len(listed) == 1
    b.follow(state(model="other"))
    assert len(listed) == 2


def test_a_record_the_producer_refused_is_sent_again_on_the_next_turn_and_the_tombstone_is_null():
    producer, clock, listed = FakeProducer(), Clock(), []
    b = beacon(producer, clock, listed)
    producer.fail = True
    b.follow(state())
    producer.fail = False
    b.follow(state())
    assert len(producer.sent) == 1
    b.leave()
    assert producer.sent[-1] is None


def holder(name: str, model: str | None, queued: int = 0, **fields) -> AgentRecord:
    fields = {"mean_job_s": 0.3, "backlog_s": 0.3 * queued, "hot_model": model, **fields}
    return AgentRecord(instance_id=name, loaded_model=model, queued=queued, at=NOW, **fields)


def test_a_models_job_is_for_its_topic_only_while_a_holder_of_the_model_is_idle():
    view = loads(holder("a", "sd15"), holder("b", "sdxl", queued=1))
    assert view.take_idle_holder("sd15")  # a is idle and holds it
    assert not view.take_idle_holder("sd15")  # a has been sent one since its beacon
    assert not view.take_idle_holder("sdxl")  # b is busy
    assert not view.take_idle_holder("flux")  # nobody holds it
    view.update("a", holder("a", "sd15"))  # a ran it
    assert view.take_idle_holder("sd15")


def test_a_holder_free_sooner_than_one_job_counts_and_its_beacon_ages():
    now = [NOW]
    view = AgentLoads(now=lambda: now[0])
    view.update("a", holder("a", "sd15", queued=1, backlog_s=0.2))  # finishing: free in 0.2 s < 0.3 s
    assert view.take_idle_holder("sd15")
    assert not view.take_idle_holder("sd15")  # now 0.5 s of work
    now[0] = NOW + timedelta(seconds=0.3)  # the beacon's backlog drains as time passes
    assert view.take_idle_holder("sd15")


def test_a_holder_that_has_run_nothing_takes_one_job_at_a_time():
    view = loads(holder("a", "sd15", mean_job_s=0.0))
    assert not view.take_idle_holder("sd15")  # no mean: only an agent free now, and "now" is
    view2 = AgentLoads(now=lambda: NOW)
    view2.update("a", holder("a", "sd15", mean_job_s=0.0))
    assert view2.pick() == KEYED  # no partitions in share mode: nothing for partition routing


def test_a_holder_is_waited_for_while_it_is_free_sooner_than_a_switch_would_take():
    view = loads(holder("a", "sd15", queued=3, backlog_s=4.0, mean_switch_s=5.0))  # 4 s of work, switch 5 s
    # free in 4.0, 4.3, 4.6, 4.9 s: sooner than a switch; then 5.2 s: a switch elsewhere is sooner
    assert [view.take_idle_holder("sd15") for _ in range(5)] == [True, True, True, True, False]


def test_a_holder_whose_topic_is_not_read_long_enough_yet_does_not_count():
    assert not loads(holder("a", "sd15", hot_model=None)).take_idle_holder("sd15")  # just switched


def test_a_stale_or_held_holder_does_not_count():
    assert not loads(holder("a", "sd15", accepting=False)).take_idle_holder("sd15")
    stale = AgentRecord(instance_id="a", loaded_model="sd15", hot_model="sd15", mean_job_s=0.3,
                        at=NOW - timedelta(seconds=STALE_AFTER_S + 1))  # fmt: skip
    assert not loads(stale).take_idle_holder("sd15")


class FakeBeacons:
    def __init__(self, view: AgentLoads) -> None:
        self.loads = view
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_model_topic_placement_sends_to_the_model_topic_or_the_jobs_topic():
    from sdagent.kafka.routing import ModelTopicPlacement

    topics = TopicsConfig(jobs_key="model", model_topics=8)
    placement = ModelTopicPlacement(FakeBeacons(loads(holder("a", "sd15"))), topics)  # type: ignore[arg-type]
    assert placement.place(Job(model="sd15")) == (topics.model_topic("sd15"), KEYED)
    assert placement.place(Job(model="sd15")) == (topics.jobs, KEYED)  # the holder got one already
    assert placement.place(Job(model="flux")) == (topics.jobs, KEYED)
    assert placement.place(Job(model="sd15", priority=3)) == (topics.priority_jobs, KEYED)


def test_model_topics_are_refused_without_model_keys_and_in_partition_mode():
    from sdagent.config import Settings

    with pytest.raises(ValueError, match="model_topics needs jobs_key = model"):
        TopicsConfig(model_topics=4)
    with pytest.raises(ValueError, match="topics.model_topics is for kafka.consumption = share"):
        Settings(topics={"jobs_key": "model", "model_topics": 4})
    topics = TopicsConfig(jobs_key="model", model_topics=4)
    assert set(topics.model_topic_names) <= topics.fleet_topics
    assert topics.model_topic("sd15") in topics.model_topic_names


def test_a_job_no_holder_can_take_soon_goes_to_the_free_agent_whose_model_is_least_in_demand():
    from sdagent.kafka.routing import ModelTopicPlacement

    topics = TopicsConfig(jobs_key="model", model_topics=64)
    view = loads(holder("hot", "popular"), holder("cold", "rare"), holder("busy", "other", queued=2, backlog_s=9))
    clock = Clock()
    placement = ModelTopicPlacement(FakeBeacons(view), topics, clock=clock)  # type: ignore[arg-type]
    for _ in range(5):
        placement._demand.seen("popular")  # what this submitter saw lately
    assert placement.place(Job(model="flux")) == (topics.model_topic("rare"), KEYED)  # "cold" switches
    assert placement.place(Job(model="flux2")) == (topics.model_topic("popular"), KEYED)  # then "hot" is all left
    assert placement.place(Job(model="flux3")) == (topics.jobs, KEYED)  # nobody free: the shared queue


def test_model_demand_decays_by_half_each_half_life():
    from sdagent.kafka.routing import DEMAND_HALF_LIFE_S, ModelDemand

    clock = Clock()
    demand = ModelDemand(clock)
    demand.seen("a")
    demand.seen("a")
    clock.now = DEMAND_HALF_LIFE_S
    assert demand.rate("a") == pytest.approx(1.0) and demand.rate("b") == 0
