"""Watching a mounted store: watchdog events and polling call on_models_changed."""

from __future__ import annotations

import queue
import shutil

import pytest

from sdagent.cache import ManifestWatcher, ModelCache, ModelsChanged
from sdagent.cache.indexer import build_manifest
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import make_store

WAIT_S = 10.0


@pytest.fixture
def store(tmp_path):
    make_store(tmp_path / "store", {"a.safetensors": b"a" * 100})
    return tmp_path / "store"


def watch(tmp_path, store, *, interval_s=60.0, use_events=True):
    cache = ModelCache(tmp_path / "cache", DirectorySource(store), budget_bytes=1 << 30)
    changes: queue.Queue[ModelsChanged] = queue.Queue()
    watcher = ManifestWatcher(cache, changes.put, interval_s=interval_s, use_events=use_events)
    watcher.start()
    return cache, watcher, changes


def test_a_new_model_indexed_into_the_store_is_reported_at_once_by_its_events(tmp_path, store):
    cache, watcher, changes = watch(tmp_path, store)  # polling alone would take a minute
    try:
        (store / "Lora").mkdir()
        (store / "Lora" / "new.safetensors").write_bytes(b"n" * 50)
        source = DirectorySource(store)
        source.write_manifest(build_manifest(source))

        change = _next_with(changes, lambda c: c.added)

        assert change.added == ("new.safetensors",) and not change.removed
        assert cache.ensure("new.safetensors").path == cache.root / "loras" / "new.safetensors"
    finally:
        watcher.stop()


def test_a_model_file_the_manifest_does_not_list_is_reported_as_unindexed(tmp_path, store):
    cache, watcher, changes = watch(tmp_path, store)
    try:
        shutil.copyfile(store / "a.safetensors", store / "copy.safetensors")

        change = _next_with(changes, lambda c: c.unindexed)

        assert change.unindexed == ("copy.safetensors",) and not change.added
    finally:
        watcher.stop()


def test_polling_finds_changes_inotify_cannot_see(tmp_path, store):
    # NFS/EFS: another client's writes raise no local event; the poll catches them.
    cache, watcher, changes = watch(tmp_path, store, interval_s=0.2, use_events=False)
    try:
        make_store(store, {"a.safetensors": b"A" * 100, "b.safetensors": b"b" * 10})

        change = _next_with(changes, lambda c: c.added or c.changed)

        assert (change.added, change.changed) == (("b.safetensors",), ("a.safetensors",))
    finally:
        watcher.stop()


def test_no_change_calls_nothing_and_a_failing_store_does_not_stop_the_watcher(tmp_path, store):
    cache, watcher, changes = watch(tmp_path, store, interval_s=0.1, use_events=False)
    try:
        assert not watcher.check()
        store.rename(tmp_path / "gone")  # the mount goes away for a while
        with pytest.raises(queue.Empty):
            changes.get(timeout=0.5)
        (tmp_path / "gone").rename(store)
        make_store(store, {"a.safetensors": b"a" * 100, "c.safetensors": b"c"})

        assert _next_with(changes, lambda c: c.added).added == ("c.safetensors",)
    finally:
        watcher.stop()


def test_a_store_not_mounted_at_start_is_polled_until_it_appears(tmp_path, store):
    store.rename(tmp_path / "later")  # the EFS mount is not up when the agent starts
    cache, watcher, changes = watch(tmp_path, store, interval_s=0.1)  # inotify cannot watch it: polls
    try:
        (tmp_path / "later").rename(store)
        make_store(store, {"a.safetensors": b"a" * 100, "d.safetensors": b"d"})

        assert _next_with(changes, lambda c: c.added).added == ("a.safetensors", "d.safetensors")
    finally:
        watcher.stop()


def _next_with(changes: queue.Queue, wanted) -> ModelsChanged:
    while True:
        change = changes.get(timeout=WAIT_S)
        if wanted(change):
            return change
