"""Which model topics a share-group agent reads: the loaded model's, the previous one's until
it is empty, and a swept one after a long idle; a lane holding a record is never left."""

from __future__ import annotations

from sdagent.agent.lanes import Lane
from sdagent.agent.model_lanes import HOT_LANE_WARM_S, PREVIOUS_EMPTY_POLLS, SWEEP_EMPTY_POLLS, ModelLanes
from sdagent.kafka.config import TopicsConfig


class FakeConsumer:
    def __init__(self) -> None:
        self.closed = False

    def subscribe(self, topics) -> None:
        self.topics = topics

    def close(self) -> None:
        self.closed = True


TOPICS = TopicsConfig(jobs_key="model", model_topics=4)


def lanes() -> list[Lane]:
    return [Lane(f"model-{k}", name, FakeConsumer) for k, name in enumerate(TOPICS.model_topic_names)]  # type: ignore[arg-type]


def models_on_distinct_topics() -> tuple[str, str, str]:
    """Three model names whose topics differ (CRC32 decides; found, not assumed)."""
    found: dict[str, str] = {}
    for i in range(100):
        topic = TOPICS.model_topic(f"m{i}") or ""
        found.setdefault(topic, f"m{i}")
        if len(found) == 3:
            break
    a, b, c = found.values()
    return a, b, c


def nothing_held(_lane: Lane) -> bool:
    return False


def names(selected: list[Lane]) -> list[str]:
    return [lane.topic for lane in selected]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_loaded_models_topic_is_read_before_the_jobs_topic_and_nothing_else_at_first():
    a, _b, _c = models_on_distinct_topics()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1")
    model_lanes.follow(None, 0.0, nothing_held)
    assert (model_lanes.before_jobs, model_lanes.after_jobs) == ([], [])
    model_lanes.follow(a, 0.0, nothing_held)
    (hot,) = model_lanes.before_jobs
    assert hot.topic == TOPICS.model_topic(a) and hot.consumer is not None
    assert model_lanes.after_jobs == []


def test_after_a_switch_the_previous_models_topic_is_read_after_the_jobs_topic_until_empty():
    a, b, _c = models_on_distinct_topics()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1")
    model_lanes.follow(a, 0.0, nothing_held)
    model_lanes.follow(b, 0.0, nothing_held)
    assert names(model_lanes.before_jobs) == [TOPICS.model_topic(b)]
    (previous,) = model_lanes.after_jobs
    assert previous.topic == TOPICS.model_topic(a)
    consumer = previous.consumer
    for _ in range(PREVIOUS_EMPTY_POLLS - 1):
        model_lanes.polled_empty(previous, nothing_held)
    assert model_lanes.after_jobs == [previous]  # a fetch may still be on its way
    model_lanes.polled_empty(previous, nothing_held)
    assert model_lanes.after_jobs == [] and consumer.closed and previous.consumer is None


def test_a_lane_holding_an_unsettled_record_is_left_only_once_it_is_settled():
    a, b, c = models_on_distinct_topics()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1")
    model_lanes.follow(a, 0.0, nothing_held)
    (lane_a,) = model_lanes.before_jobs
    model_lanes.follow(b, 0.0, nothing_held)
    held = {id(lane_a)}
    model_lanes.follow(c, 0.0, lambda lane: id(lane) in held)  # a third model: a's lane is retired
    assert lane_a.consumer is not None  # still holding: not left
    held.clear()
    model_lanes.follow(c, 0.0, nothing_held)
    assert lane_a.consumer is None


def test_switching_back_keeps_the_lane_that_was_being_left():
    a, b, _c = models_on_distinct_topics()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1")
    model_lanes.follow(a, 0.0, nothing_held)
    (lane_a,) = model_lanes.before_jobs
    model_lanes.follow(b, 0.0, nothing_held)
    model_lanes.follow(a, 0.0, nothing_held)
    assert model_lanes.before_jobs == [lane_a] and lane_a.consumer is not None
    assert names(model_lanes.after_jobs) == [TOPICS.model_topic(b)]


def test_a_long_idle_sweeps_one_other_topic_at_a_time_in_turn():
    a, _b, _c = models_on_distinct_topics()
    clock = Clock()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1", sweep_idle_s=5.0, clock=clock)
    model_lanes.follow(a, 4.9, nothing_held)
    assert model_lanes.after_jobs == []
    swept_topics = []
    for turn in range(3):
        clock.now = 10.0 * (turn + 1)
        model_lanes.follow(a, 5.0, nothing_held)
        (swept,) = model_lanes.after_jobs
        assert swept.topic != TOPICS.model_topic(a) and swept.consumer is not None
        swept_topics.append(swept.topic)
        consumer = swept.consumer
        for _ in range(SWEEP_EMPTY_POLLS):
            model_lanes.polled_empty(swept, nothing_held)
        assert model_lanes.after_jobs == [] and consumer.closed
    assert len(set(swept_topics)) == 3  # every other topic once


def test_leaving_all_closes_every_lane_and_a_later_follow_joins_the_hot_one_again():
    a, b, _c = models_on_distinct_topics()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1")
    model_lanes.follow(a, 0.0, nothing_held)
    model_lanes.follow(b, 0.0, nothing_held)
    joined = model_lanes.before_jobs + model_lanes.after_jobs
    model_lanes.leave_all()
    assert all(lane.consumer is None for lane in joined)
    model_lanes.follow(b, 0.0, nothing_held)
    assert names(model_lanes.before_jobs) == [TOPICS.model_topic(b)] and model_lanes.before_jobs[0].consumer


def test_the_loaded_model_is_told_to_routers_once_its_topic_has_been_read_a_while():
    a, b, _c = models_on_distinct_topics()
    clock = Clock()
    model_lanes = ModelLanes(lanes(), TOPICS.model_topic, "agent-1", clock=clock)
    model_lanes.follow(a, 0.0, nothing_held)
    assert model_lanes.routable_model(a) is None  # joined just now: no assignment yet
    clock.now = HOT_LANE_WARM_S
    assert model_lanes.routable_model(a) == a
    assert model_lanes.routable_model(b) is None  # loaded, but its lane is not read yet
    model_lanes.follow(b, 0.0, nothing_held)
    model_lanes.follow(a, 0.0, nothing_held)  # back to a: its lane was still read (previous)
    assert model_lanes.routable_model(a) == a
