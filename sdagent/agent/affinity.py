"""Model affinity: jobs keyed by model so that a partition's jobs mostly share one, and an agent
that prefers, among the jobs it holds, one for the model it has loaded. See docs/model-affinity.md.

A switch costs seconds to tens of seconds on a GPU (the checkpoint is read and moved to VRAM);
a generation costs 2-3 s. Every switch avoided is a job's worth of GPU time.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdagent.kafka.records import Delivery


def pick_next(held: Sequence[Delivery], loaded_model: str | None, passed_over: int, max_passed_over: int) -> int:
    """Which of the ``held`` jobs (oldest first) runs next: the oldest, unless the next job of
    another partition needs the model already loaded and the oldest was passed over fewer than
    ``max_passed_over`` times. Only a partition's next record is eligible: offsets are committed
    in order within a partition."""
    oldest = held[0]
    if loaded_model is None or oldest.model == loaded_model or passed_over >= max_passed_over:
        return 0
    seen: set[tuple[str, int]] = set()
    for index, delivery in enumerate(held):
        partition = (delivery.topic, delivery.partition)
        if partition in seen:
            continue
        seen.add(partition)
        if delivery.model == loaded_model:
            return index
    return 0
