"""freeze_startup_heap: start-up's objects leave the collector's reach; garbage is not kept."""

import gc
import weakref

from sdagent.heap import freeze_startup_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_start_up_heap_is_frozen_and_its_garbage_collected_first():
    gc.unfreeze()
    try:
        kept = _Cycle()
        garbage = _Cycle()
        collected = weakref.ref(garbage)
        del garbage  # unreachable, kept alive by its own cycle until a collection
        frozen = freeze_startup_heap()
        assert collected() is None  # collected before the freeze, not frozen with the rest
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects())  # frozen: out of the collector's lists
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
