"""The model cache against a directory store in tmp dirs: budget, eviction, pins, staging, errors."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from sdagent.cache import (
    CacheFull,
    ModelCache,
    ModelCorrupt,
    ModelInUse,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
)
from sdagent.cache.manifest import Manifest, ModelEntry
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import InstrumentedSource, enospc_after, make_store, model_bytes
from sdagent.errors import TRANSIENT_ERRORS, BackendError, BackendUnavailable

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # small read chunks so tests see several ranges per model


class Clock:
    """A wall clock that moves one second per reading: LRU order follows call order."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def open_cache(tmp_path: Path, store: Path, *, budget=10 * MiB, source=None, **options) -> ModelCache:
    source = source or InstrumentedSource(DirectorySource(store, chunk=CHUNK))
    options.setdefault("clock", Clock())
    return ModelCache(tmp_path / "cache", source, budget_bytes=budget, **options)


def visible_files(cache: ModelCache) -> list[str]:
    """Files where the WebUI looks: everything outside the control directory."""
    return sorted(p.relative_to(cache.root).as_posix() for p in cache.root.rglob("*")
                  if p.is_file() and ".sdagent" not in p.parts)  # fmt: skip


def staging_files(cache: ModelCache) -> list[str]:
    return sorted(p.name for p in (cache.root / ".sdagent" / "staging").iterdir())


# --- staging and hits --------------------------------------------------------------------------------


def test_miss_stages_a_verified_copy_and_a_second_call_is_a_hit(tmp_path, store):
    data = model_bytes("sd15.safetensors", 300 * KiB)
    make_store(store, {"sd15.safetensors": data, "detail.safetensors": b"x" * 10}, kinds={"detail.safetensors": "lora"})
    cache = open_cache(tmp_path, store)

    first = cache.ensure("sd15.safetensors")
    second = cache.ensure("sd15")  # jobs may leave the suffix out

    assert first.staged and not second.staged
    assert first.path == second.path == cache.root / "checkpoints" / "sd15.safetensors"
    assert first.path.read_bytes() == data
    assert first.sha256 == hashlib.sha256(data).hexdigest() and first.size == len(data)
    assert cache.ensure("detail.safetensors").path == cache.root / "loras" / "detail.safetensors"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.downloads, stats.bytes_downloaded) == (1, 2, 2, len(data) + 10)
    assert len(cache.source.fetches) == 2


def test_unknown_model_is_model_not_found(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 100})
    cache = open_cache(tmp_path, store)

    with pytest.raises(ModelNotFound):
        cache.ensure("nope.safetensors")
    assert issubclass(ModelNotFound, BackendError) and not issubclass(ModelNotFound, BackendUnavailable)


def test_model_added_to_the_store_later_is_found_by_rereading_the_manifest(tmp_path, store, monkeypatch):
    make_store(store, {"a.safetensors": b"a" * 100})
    cache = open_cache(tmp_path, store)
    cache.ensure("a.safetensors")
    make_store(store, {"a.safetensors": b"a" * 100, "b.safetensors": b"b" * 100})
    monkeypatch.setattr("sdagent.cache.cache.MANIFEST_RECHECK_S", 0.0)

    assert cache.ensure("b.safetensors").staged


def test_a_new_version_in_the_store_is_staged_over_the_old_one(tmp_path, store):
    make_store(store, {"a.safetensors": b"old" * 100})
    cache = open_cache(tmp_path, store)
    cache.ensure("a.safetensors")
    make_store(store, {"a.safetensors": b"new" * 100})

    diff = cache.refresh_manifest()
    local = cache.ensure("a.safetensors")

    assert diff.changed == ("a.safetensors",)
    assert local.staged and local.path.read_bytes() == b"new" * 100


# --- budget and LRU ------------------------------------------------------------------------------------


def test_least_recently_used_models_are_evicted_to_stay_within_the_budget(tmp_path, store):
    models = {f"{n}.safetensors": model_bytes(n, 100 * KiB) for n in "abcde"}
    make_store(store, models)
    cache = open_cache(tmp_path, store, budget=300 * KiB)

    for name in ("a", "b", "c", "a", "d"):  # a is touched again: b is now the oldest
        cache.ensure(name)
    assert visible_files(cache) == [
        "checkpoints/a.safetensors",
        "checkpoints/c.safetensors",
        "checkpoints/d.safetensors",
    ]

    cache.ensure("e")  # c goes next
    assert visible_files(cache) == [
        "checkpoints/a.safetensors",
        "checkpoints/d.safetensors",
        "checkpoints/e.safetensors",
    ]
    assert cache.cached_bytes() == 300 * KiB
    assert (cache.stats().evictions, cache.stats().bytes_evicted) == (2, 200 * KiB)
    assert [e.name for e in cache.ls()] == ["e.safetensors", "d.safetensors", "a.safetensors"]


def test_a_pinned_model_is_never_evicted(tmp_path, store):
    make_store(store, {f"{n}.safetensors": model_bytes(n, 100 * KiB) for n in "abcd"})
    cache = open_cache(tmp_path, store, budget=200 * KiB)

    with cache.use("a") as a:
        cache.ensure("b")
        cache.ensure("c")  # a is the least recently used, but pinned: b goes
        assert a.path.exists()
        assert visible_files(cache) == ["checkpoints/a.safetensors", "checkpoints/c.safetensors"]
        with cache.use("c"):
            with pytest.raises(CacheFull):  # both in use: no room, nothing evicted
                cache.ensure("d")
            assert visible_files(cache) == ["checkpoints/a.safetensors", "checkpoints/c.safetensors"]
            with pytest.raises(ModelInUse):
                cache.evict("a")
    assert cache.ensure("d").staged  # pins released: a (least recently used) goes
    assert visible_files(cache) == ["checkpoints/c.safetensors", "checkpoints/d.safetensors"]
    assert issubclass(CacheFull, TRANSIENT_ERRORS)  # the job is retried once pins are released


def test_a_model_larger_than_the_budget_is_refused_without_evicting(tmp_path, store):
    make_store(store, {"small.safetensors": b"s" * 100, "huge.safetensors": b"h" * 2000})
    cache = open_cache(tmp_path, store, budget=1000)
    cache.ensure("small")

    with pytest.raises(ModelTooLarge):
        cache.ensure("huge")
    assert visible_files(cache) == ["checkpoints/small.safetensors"]


def test_room_is_made_on_the_disk_too_before_downloading(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 1000, "b.safetensors": b"b" * 1000})
    free = {"bytes": 10_000}
    cache = open_cache(tmp_path, store, budget=1 * MiB, min_free_bytes=500, disk_free=lambda _: free["bytes"])
    cache.ensure("a")
    free["bytes"] = 1200  # b (1000) + min_free (500) do not fit until a goes

    cache.ensure("b")

    assert visible_files(cache) == ["checkpoints/b.safetensors"]
    free["bytes"] = 100
    cache.evict("b")
    with pytest.raises(CacheFull):
        cache.ensure("a")
    assert len(cache.source.fetches) == 2  # refused before any byte was fetched


# --- verification, atomicity, resume ------------------------------------------------------------------


def test_checksum_mismatch_is_never_served_and_leaves_nothing_behind(tmp_path, store):
    data = model_bytes("a", 200 * KiB)
    make_store(store, {"a.safetensors": data})
    wrong = ModelEntry(name="a.safetensors", size=len(data), sha256="0" * 64)
    DirectorySource(store).write_manifest(Manifest([wrong]))
    cache = open_cache(tmp_path, store)

    for _ in range(2):  # and the next call tries again rather than serving what it got
        with pytest.raises(ModelCorrupt):
            cache.ensure("a.safetensors")
    assert visible_files(cache) == []
    assert staging_files(cache) == []
    assert cache.ls() == []
    assert cache.stats().corrupt == 2 and len(cache.source.fetches) == 2


def test_a_store_file_whose_size_differs_from_the_manifest_is_refused(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 1000})
    (store / "a.safetensors").write_bytes(b"a" * 999)
    cache = open_cache(tmp_path, store)

    with pytest.raises(ModelCorrupt):
        cache.ensure("a")
    assert visible_files(cache) == [] and staging_files(cache) == []


def test_interrupted_download_keeps_its_partial_file_hidden_and_resumes_from_it(tmp_path, store):
    data = model_bytes("a", 1 * MiB)
    make_store(store, {"a.safetensors": data})
    source = InstrumentedSource(DirectorySource(store, chunk=CHUNK), fail_after=300 * KiB)
    cache = open_cache(tmp_path, store, source=source)

    with pytest.raises(ModelUnavailable):
        cache.ensure("a")
    assert visible_files(cache) == []
    partials = [n for n in staging_files(cache) if n.endswith(".partial")]
    assert len(partials) == 1 and any(n.endswith(".json") for n in staging_files(cache))
    kept = (cache.root / ".sdagent" / "staging" / partials[0]).stat().st_size
    assert kept >= 300 * KiB

    local = cache.ensure("a")

    assert [f.offset for f in source.fetches] == [0, kept]
    assert local.path.read_bytes() == data
    assert staging_files(cache) == []
    assert cache.stats().resumes == 1 and cache.stats().bytes_downloaded == len(data) - kept


def test_a_damaged_partial_is_discarded_and_the_download_starts_over(tmp_path, store):
    data = model_bytes("a", 512 * KiB)
    make_store(store, {"a.safetensors": data})
    source = InstrumentedSource(DirectorySource(store, chunk=CHUNK), fail_after=128 * KiB)
    cache = open_cache(tmp_path, store, source=source)
    with pytest.raises(ModelUnavailable):
        cache.ensure("a")
    [partial] = (cache.root / ".sdagent" / "staging").glob("*.partial")
    partial.write_bytes(b"\0" * partial.stat().st_size)  # e.g. a power cut before writeback

    local = cache.ensure("a")

    assert [f.offset for f in source.fetches][-1] == 0
    assert local.path.read_bytes() == data


def test_a_partial_of_an_older_version_is_not_resumed(tmp_path, store):
    make_store(store, {"a.safetensors": model_bytes("old", 512 * KiB)})
    source = InstrumentedSource(DirectorySource(store, chunk=CHUNK), fail_after=128 * KiB)
    cache = open_cache(tmp_path, store, source=source)
    with pytest.raises(ModelUnavailable):
        cache.ensure("a")
    new = model_bytes("new", 512 * KiB)
    make_store(store, {"a.safetensors": new})
    cache.refresh_manifest()

    local = cache.ensure("a")

    assert source.fetches[-1].offset == 0 and local.path.read_bytes() == new
    assert len(list((cache.root / ".sdagent" / "staging").glob("*.partial"))) == 0


def test_disk_full_while_writing_is_an_error_and_removes_the_partial(tmp_path, store):
    make_store(store, {"a.safetensors": model_bytes("a", 512 * KiB)})
    cache = open_cache(tmp_path, store, write=enospc_after(200 * KiB))

    with pytest.raises(CacheFull, match="disk full"):
        cache.ensure("a")
    assert visible_files(cache) == [] and staging_files(cache) == []
    assert cache._state.read().staging == {}  # the reservation went with it


# --- one download per model --------------------------------------------------------------------------


def test_eight_threads_asking_at_once_download_once(tmp_path, store):
    data = model_bytes("a", 1 * MiB)
    make_store(store, {"a.safetensors": data})
    source = InstrumentedSource(DirectorySource(store, chunk=CHUNK), delay_per_write_s=0.01)
    cache = open_cache(tmp_path, store, source=source)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def ask() -> None:
        barrier.wait()
        try:
            results.append(cache.ensure("a.safetensors"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert len(source.fetches) == 1
    assert {r.path for r in results} == {cache.root / "checkpoints" / "a.safetensors"}
    assert all(r.staged for r in results)  # every caller waited for the one download
    assert cache.stats().downloads == 1 and cache.stats().misses == 8


def test_concurrent_callers_all_get_the_error_of_the_one_failed_download(tmp_path, store):
    make_store(store, {"a.safetensors": model_bytes("a", 256 * KiB)})
    DirectorySource(store).write_manifest(Manifest([ModelEntry(name="a.safetensors", size=256 * KiB, sha256="1" * 64)]))
    source = InstrumentedSource(DirectorySource(store, chunk=CHUNK), delay_per_write_s=0.02)
    cache = open_cache(tmp_path, store, source=source)
    barrier = threading.Barrier(4)
    errors = []

    def ask() -> None:
        barrier.wait()
        try:
            cache.ensure("a.safetensors")
        except ModelCorrupt as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(errors) == 4 and len(source.fetches) <= 2  # a late caller may try once more


# --- store unavailable ------------------------------------------------------------------------------------


def test_local_copies_are_served_while_the_store_is_unreachable(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 100, "b.safetensors": b"b" * 100})
    first = open_cache(tmp_path, store)
    first.ensure("a")
    store.rename(tmp_path / "unmounted")

    cache = open_cache(tmp_path, store)  # a restart: the manifest cannot be read
    assert not cache.ensure("a").staged
    with pytest.raises(ModelUnavailable) as raised:
        cache.ensure("b")
    assert isinstance(raised.value, TRANSIENT_ERRORS)


# --- prewarm ----------------------------------------------------------------------------------------------


def test_prewarm_stages_the_most_used_models_of_the_history_and_reports_failures(tmp_path, store):
    make_store(store, {f"{n}.safetensors": model_bytes(n, 10 * KiB) for n in "abc"})
    cache = open_cache(tmp_path, store)
    for name in ("a", "a", "a", "b", "c", "c"):
        cache.ensure(name)
    for name in ("a", "b", "c"):
        cache.evict(name)

    report = cache.prewarm(["missing.safetensors"], most_used=2)

    assert [(r.name, r.staged) for r in report.results] == [
        ("missing.safetensors", False), ("a.safetensors", True), ("c.safetensors", True)]  # fmt: skip
    assert "ModelNotFound" in report.results[0].error
    assert [r.name for r in report.failed] == ["missing.safetensors"]
    assert all(r.ms >= 0 for r in report.results) and report.total_ms >= sum(r.ms for r in report.results) * 0.5
    assert visible_files(cache) == ["checkpoints/a.safetensors", "checkpoints/c.safetensors"]


def test_prewarm_skips_what_does_not_fit_the_budget_together(tmp_path, store):
    make_store(store, {f"{n}.safetensors": model_bytes(n, 100 * KiB) for n in "abc"})
    cache = open_cache(tmp_path, store, budget=250 * KiB)

    report = cache.prewarm(["a", "b", "c"])

    assert [r.error is None for r in report.results] == [True, True, False]
    assert visible_files(cache) == ["checkpoints/a.safetensors", "checkpoints/b.safetensors"]


# --- operator actions -------------------------------------------------------------------------------------


def test_verify_removes_a_copy_whose_bytes_changed_and_reports_strays(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 1000, "b.safetensors": b"b" * 1000})
    cache = open_cache(tmp_path, store)
    cache.ensure("a")
    cache.ensure("b")
    (cache.root / "checkpoints" / "b.safetensors").write_bytes(b"B" * 1000)  # bit rot, or a stray edit
    (cache.root / "checkpoints" / "stray.ckpt").write_bytes(b"?")

    results = {r.name: r.status for r in cache.verify()}

    assert results == {"a.safetensors": "ok", "b.safetensors": "corrupt", "checkpoints/stray.ckpt": "unknown"}
    assert [e.name for e in cache.ls()] == ["a.safetensors"]
    assert cache.ensure("b").staged  # staged again from the store


def test_a_restart_forgets_copies_that_vanished_and_cleans_stray_partials(tmp_path, store):
    make_store(store, {"a.safetensors": b"a" * 1000})
    cache = open_cache(tmp_path, store)
    cache.ensure("a")
    (cache.root / "checkpoints" / "a.safetensors").unlink()
    stray = cache.root / ".sdagent" / "staging" / "x.safetensors.1-abcd.partial"
    stray.write_bytes(b"half")

    again = open_cache(tmp_path, store)

    assert again.ls() == [] and not stray.exists()
    assert again.ensure("a").staged


# --- the two copy paths of a directory store -------------------------------------------------------


@pytest.mark.parametrize("copy_mode", ["kernel", "pread"])
def test_both_copy_paths_stage_verified_copies_and_refuse_corrupt_ones(tmp_path, store, copy_mode):
    data = model_bytes("a", 3 * MiB + 123)
    make_store(store, {"a.safetensors": data, "b.safetensors": data})
    good = ModelEntry(name="a.safetensors", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    bad = ModelEntry(name="b.safetensors", size=len(data), sha256="2" * 64)
    DirectorySource(store).write_manifest(Manifest([good, bad]))
    source = DirectorySource(store, chunk=CHUNK, copy_mode=copy_mode)
    cache = open_cache(tmp_path, store, source=source)

    assert cache.ensure("a").path.read_bytes() == data
    with pytest.raises(ModelCorrupt):
        cache.ensure("b")
    assert visible_files(cache) == ["checkpoints/a.safetensors"] and staging_files(cache) == []


def test_the_kernel_copy_path_resumes_a_partial(tmp_path, store):
    data = model_bytes("a", 1 * MiB)
    make_store(store, {"a.safetensors": data})
    cut = InstrumentedSource(DirectorySource(store, chunk=CHUNK), fail_after=400 * KiB)
    with pytest.raises(ModelUnavailable):
        open_cache(tmp_path, store, source=cut).ensure("a")

    cache = open_cache(tmp_path, store, source=DirectorySource(store, chunk=CHUNK, copy_mode="kernel"))
    local = cache.ensure("a")

    assert local.path.read_bytes() == data and cache.stats().resumes == 1
