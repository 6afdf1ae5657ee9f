"""CachedModels: what the job loop gets from the cache, and when it tells the WebUI to rescan."""

from __future__ import annotations

import shutil

import pytest

from sdagent.cache import ModelCache, ModelCorrupt, ModelInUse, ModelUnavailable
from sdagent.cache.serving import CachedModels, ServedModel, UncachedModels
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import make_store, model_bytes
from sdagent.cache.watch import ModelsChanged
from sdagent.metrics.jobs import JobMetrics

NAME = "base.safetensors"
SIZE = 64 * 1024


@pytest.fixture
def cache(tmp_path):
    make_store(tmp_path / "store", {NAME: model_bytes(NAME, SIZE)})
    opened = ModelCache(tmp_path / "cache", DirectorySource(tmp_path / "store"), budget_bytes=10 * SIZE)
    yield opened
    opened.close()


def test_a_staged_model_reports_its_stage_time_and_asks_for_one_rescan(cache):
    models = CachedModels(cache)

    with models.use("base") as served:  # a name without its suffix resolves through the manifest
        assert served.name == NAME and served.stage_ms is not None and served.stage_ms > 0

    assert models.take_rescan() is True
    assert models.take_rescan() is False


def test_a_cached_model_is_a_hit_without_a_rescan(cache):
    models = CachedModels(cache)
    with models.use(NAME):
        pass
    models.take_rescan()

    with models.use(NAME) as served:
        assert served == ServedModel(NAME, None)

    assert models.take_rescan() is False


def test_a_model_in_use_cannot_be_evicted(cache):
    models = CachedModels(cache)
    with models.use(NAME), pytest.raises(ModelInUse):
        cache.evict(NAME)
    assert cache.evict(NAME) == SIZE


def test_hits_and_misses_are_counted_in_the_job_metrics(cache):
    recorder = JobMetrics()
    models = CachedModels(cache, recorder)
    for _ in range(3):
        with models.use(NAME):
            pass

    data = {datum.name: datum.value for datum in recorder.collect(0.0, identity=_identity())}
    assert data["ModelCacheMisses"] == 1 and data["ModelCacheHits"] == 2


def test_a_model_the_store_does_not_have_goes_to_the_webui_unchanged(cache):
    models = CachedModels(cache)

    with models.use("builtin.safetensors") as served:
        assert served == ServedModel("builtin.safetensors", None)

    assert models.take_rescan() is False


def test_with_the_store_unreachable_the_webuis_own_model_is_still_served(cache, tmp_path):
    shutil.rmtree(tmp_path / "store")  # the mount went away before the manifest was read
    models = CachedModels(cache, webui_models=lambda: ("builtin.safetensors",))

    with models.use("builtin.safetensors") as served:
        assert served == ServedModel("builtin.safetensors", None)
    with pytest.raises(ModelUnavailable):  # maybe in the store: retried, never guessed
        with models.use(NAME):
            pass


def test_a_corrupt_store_copy_raises_and_leaves_nothing_to_serve(cache, tmp_path):
    (tmp_path / "store" / NAME).write_bytes(model_bytes("other", SIZE))
    models = CachedModels(cache)

    with pytest.raises(ModelCorrupt), models.use(NAME):
        pass
    assert not (tmp_path / "cache" / "checkpoints" / NAME).exists()


@pytest.mark.parametrize(
    ("change", "rescan"),
    [
        (ModelsChanged(added=("new.safetensors",)), True),
        (ModelsChanged(changed=(NAME,)), True),
        (ModelsChanged(removed=(NAME,)), True),
        (ModelsChanged(unindexed=("not-yet-indexed.safetensors",)), False),  # cannot be served yet
    ],
)
def test_store_changes_ask_for_a_rescan_when_the_served_list_changes(cache, change, rescan):
    models = CachedModels(cache)
    models.models_changed(change)
    assert models.take_rescan() is rescan


def test_without_a_cache_the_name_passes_through():
    models = UncachedModels()
    with models.use("any.safetensors") as served:
        assert served == ServedModel("any.safetensors", None)
    assert models.take_rescan() is False


def _identity():
    from sdagent.metrics.dimensions import InstanceIdentity

    return InstanceIdentity("i-0123456789abcdef0", "g5.xlarge", None)
