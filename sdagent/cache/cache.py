"""The model cache: models from a store (S3 or a mounted directory) kept on local NVMe for the WebUI.

Layout under the cache directory (docs/model-cache.md)::

    checkpoints/ loras/ vae/ embeddings/   verified models only: what the WebUI is pointed at
    .sdagent/state.json                    verified models, LRU times, usage history, reservations
    .sdagent/staging/                      partial downloads and their resume records
    .sdagent/locks/                        one lock file per model, and one for the state

Guarantees: a file appears under a model folder only by an atomic rename after its sha256 matched
the manifest and it was fsynced; one download per model at a time, across threads (a shared
future) and processes (an exclusive flock on the model's lock file); a model in use (shared flock,
taken by :meth:`ModelCache.use`) or being staged is never evicted.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from sdagent.cache.errors import (
    CacheFull,
    ManifestMissing,
    ModelCorrupt,
    ModelInUse,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
)
from sdagent.cache.locks import FileLock
from sdagent.cache.manifest import KIND_DIRS, Manifest, ManifestDiff, ModelEntry
from sdagent.cache.sources.base import ModelSource
from sdagent.cache.staging import READ_CHUNK, Stager, WriteFn, model_key
from sdagent.cache.state import DEFAULT_HISTORY_SIZE, CachedModel, Reservation, State, StateStore
from sdagent.errors import SdagentError
from sdagent.modelnames import match_model

log = structlog.get_logger(__name__)

CONTROL_DIR = ".sdagent"
USE_ATTEMPTS = 3  # ensure-then-pin rounds before giving up on a model evicted in between
# A name missing from the manifest re-reads it at most this often: a model added to the store
# since the last read is found without waiting for the watcher, a typo does not hammer the store.
MANIFEST_RECHECK_S = 30.0


@dataclass(frozen=True)
class LocalModel:
    """A verified model on local disk, as :meth:`ModelCache.ensure` returns it."""

    name: str  # the manifest's name: what the WebUI lists, relative to its kind folder
    path: Path
    size: int
    sha256: str
    kind: str
    staged: bool  # it was not on local disk when asked: this call waited for a download
    stage_ms: float  # how long this call took


@dataclass
class CacheStats:
    """Counters since the cache was opened (this process only)."""

    hits: int = 0  # ensure() found the model on local disk
    misses: int = 0  # ensure() waited for a download (its own, another thread's or process's)
    downloads: int = 0  # downloads this process made
    bytes_downloaded: int = 0
    resumes: int = 0  # downloads that continued a partial file
    evictions: int = 0
    bytes_evicted: int = 0
    corrupt: int = 0  # downloads whose sha256 or size did not match: removed, never served
    failures: int = 0  # downloads that failed for any other reason


@dataclass(frozen=True)
class PrewarmResult:
    name: str
    staged: bool
    ms: float
    error: str | None = None


@dataclass(frozen=True)
class PrewarmReport:
    results: list[PrewarmResult] = field(default_factory=list)
    total_ms: float = 0.0

    @property
    def failed(self) -> list[PrewarmResult]:
        return [r for r in self.results if r.error is not None]


@dataclass(frozen=True)
class CachedEntry:
    """A model on local disk, as :meth:`ModelCache.ls` lists it."""

    name: str
    kind: str
    size: int
    sha256: str
    path: Path
    last_used: float
    uses: int
    in_use: bool  # pinned by a job, or being restaged


@dataclass(frozen=True)
class VerifyResult:
    name: str
    status: str  # ok, corrupt (removed), missing, stale (the store has another version), in_use, unknown
    detail: str = ""


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class ModelCache:
    """Models of one store, staged on demand into ``root`` within ``budget_bytes``.

    ``disk_free`` (bytes available under a path) and ``write`` (``os.write``) are seams for tests.
    """

    def __init__(
        self,
        root: Path,
        source: ModelSource,
        *,
        budget_bytes: int,
        min_free_bytes: int = 0,
        lock_timeout_s: float = 1800.0,
        history_size: int = DEFAULT_HISTORY_SIZE,
        clock: Callable[[], float] = time.time,
        disk_free: Callable[[Path], int] = _disk_free,
        write: WriteFn = os.write,
    ) -> None:
        self.root = Path(root)
        self.source = source
        self.budget_bytes = budget_bytes
        self._min_free = min_free_bytes
        self._lock_timeout_s = lock_timeout_s
        self._clock = clock
        self._disk_free = disk_free
        control = self.root / CONTROL_DIR
        self._locks_dir = control / "locks"
        staging_dir = control / "staging"
        for directory in (self._locks_dir, staging_dir, *(self.root / d for d in KIND_DIRS.values())):
            directory.mkdir(parents=True, exist_ok=True)
        self._state = StateStore(control / "state.json", self._locks_dir / "state.lock", history_size=history_size)
        self._stager = Stager(self.root, staging_dir, write=write)
        self._manifest: Manifest | None = None
        self._manifest_version: str | None = None
        self._manifest_checked = float("-inf")
        self._manifest_lock = threading.Lock()
        self._inflight: dict[str, Future[CachedModel]] = {}
        self._inflight_lock = threading.Lock()
        self._pins: collections.Counter[str] = collections.Counter()
        self._pins_lock = threading.Lock()
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._recover()

    # --- the store's manifest ------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The store's manifest, read on first use; ModelUnavailable or ManifestMissing if it can't be."""
        with self._manifest_lock:
            if self._manifest is None:
                self._read_manifest()
            assert self._manifest is not None  # _read_manifest sets it or raises
            return self._manifest

    def refresh_manifest(self) -> ManifestDiff:
        """Read the manifest again; what changed since the last read (all added on the first)."""
        with self._manifest_lock:
            old = self._manifest
            self._read_manifest()
            new = self._manifest
        assert new is not None  # _read_manifest sets it or raises
        return old.diff(new) if old is not None else ManifestDiff(added=tuple(new.names()))

    @property
    def manifest_version(self) -> str | None:
        return self._manifest_version

    def _read_manifest(self) -> None:
        manifest, version = self.source.read_manifest()
        self._manifest, self._manifest_version = manifest, version
        self._manifest_checked = time.monotonic()
        log.info("cache.manifest_loaded", source=self.source.url, models=len(manifest), version=version)

    # --- staging -----------------------------------------------------------------------------------

    def ensure(self, name: str) -> LocalModel:
        """The model named ``name`` (or its name without suffix) on local disk, staged if missing.

        Returns at once on a hit. Raises ModelNotFound, ModelCorrupt, ModelTooLarge, CacheFull and
        ModelUnavailable (transient: the store is unreachable; a later call resumes the download).
        """
        started = time.perf_counter()
        entry, manifest_error = self._entry_for(name)
        cached = self._hit(entry)
        if cached is not None:
            self._count(hits=1)
            return self._local(cached, staged=False, started=started)
        if manifest_error is not None:
            raise manifest_error  # only the local copy was known, and it is gone
        self._count(misses=1)
        cached = self._stage_once(entry)
        return self._local(cached, staged=True, started=started)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[LocalModel]:
        """``ensure(name)`` and keep the model from eviction until the block ends (any process)."""
        for _ in range(USE_ATTEMPTS):
            local = self.ensure(name)
            lock = self._model_lock(local.name)
            if not lock.acquire(shared=True, timeout=self._lock_timeout_s):
                raise ModelUnavailable(f"{local.name} stayed locked by a stager for {self._lock_timeout_s:.0f}s")
            if self._still_cached(local):
                break
            lock.release()  # evicted or replaced between ensure and pin: once more
        else:
            raise ModelUnavailable(f"{name} was evicted {USE_ATTEMPTS} times before it could be pinned")
        with self._pins_lock:
            self._pins[local.name] += 1
        try:
            yield local
        finally:
            with self._pins_lock:
                self._pins[local.name] -= 1
                if not self._pins[local.name]:
                    del self._pins[local.name]
            lock.release()

    def prewarm(self, names: Iterable[str] | None = None, *, most_used: int = 0, concurrency: int = 2) -> PrewarmReport:
        """Stage ``names`` and the ``most_used`` models of the local usage history, ``concurrency``
        at a time (one model's fsync then overlaps the next one's copy).

        Failures are reported, not raised: a model missing from the store must not keep the agent
        from taking work. Models that would not fit in the budget together are skipped.
        """
        started = time.perf_counter()
        wanted = list(dict.fromkeys([*(names or ()), *self.most_used(most_used)]))
        planned = 0
        results: dict[str, PrewarmResult] = {}
        to_stage = []
        for name in wanted:
            size = self._known_size(name)
            if size is not None and planned + size > self.budget_bytes:
                error = ModelTooLarge(f"{name} does not fit in the budget with the models prewarmed before it")
                results[name] = self._prewarm_failed(name, error, time.perf_counter())
                continue
            planned += size or 0
            to_stage.append(name)

        def one(name: str) -> PrewarmResult:
            one_started = time.perf_counter()
            try:
                local = self.ensure(name)
            except SdagentError as exc:
                return self._prewarm_failed(name, exc, one_started)
            return PrewarmResult(local.name, local.staged, local.stage_ms)

        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="cache-prewarm") as pool:
            results.update(zip(to_stage, pool.map(one, to_stage)))
        report = PrewarmReport([results[name] for name in wanted], _ms_since(started))
        log.info("cache.prewarmed", models=len(wanted), staged=sum(r.staged for r in report.results),
                 failed=len(report.failed), ms=round(report.total_ms))  # fmt: skip
        return report

    def _prewarm_failed(self, name: str, exc: Exception, started: float) -> PrewarmResult:
        log.warning("cache.prewarm_failed", model=name, error=str(exc), error_type=type(exc).__name__)
        return PrewarmResult(name, False, _ms_since(started), f"{type(exc).__name__}: {exc}")

    def most_used(self, count: int) -> list[str]:
        """The ``count`` most used model names of the local usage history."""
        return self._state.read().most_used(count) if count > 0 else []

    # --- operator actions ---------------------------------------------------------------------------

    def evict(self, name: str) -> int:
        """Remove ``name`` from local disk; the bytes freed (0 if it was not cached).
        Raises ModelInUse if a job uses it or a stager writes it."""
        with self._state.transaction() as state:
            cached = _resolve_cached(state, name)
            if cached is None:
                return 0
            lock = self._model_lock(cached.name)
            if not lock.acquire(timeout=0):
                raise ModelInUse(f"{cached.name} is in use or being staged")
            try:
                self._remove(state, cached, reason="requested")
            finally:
                lock.release()
        return cached.size

    def ls(self) -> list[CachedEntry]:
        """The models on local disk, most recently used first."""
        state = self._state.read()
        entries = []
        for cached in sorted(state.models.values(), key=lambda m: -m.last_used):
            usage = state.usage.get(cached.name)
            entries.append(CachedEntry(cached.name, cached.kind, cached.size, cached.sha256, self.root / cached.path,
                                       cached.last_used, usage.count if usage else 0,
                                       self._in_use(cached.name)))  # fmt: skip
        return entries

    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Hash local copies again; a copy whose bytes changed is removed. Also reports copies
        the store now has in another version (restaged on next use) and files the cache did
        not stage (unknown: never served by :meth:`ensure`, left alone)."""
        state = self._state.read()
        if name is not None:
            cached = _resolve_cached(state, name)
            if cached is None:
                return [VerifyResult(name, "missing", "not on local disk")]
            targets = [cached]
        else:
            targets = sorted(state.models.values(), key=lambda m: m.name)
        manifest = self._manifest_or_none()
        results = [self._verify_one(cached, manifest) for cached in targets]
        if name is None:
            known = {cached.path for cached in targets}
            for folder in KIND_DIRS.values():
                for path in sorted((self.root / folder).rglob("*")):
                    relative = path.relative_to(self.root).as_posix()
                    if path.is_file() and relative not in known:
                        results.append(VerifyResult(relative, "unknown", "not staged by the cache"))
        return results

    def stats(self) -> CacheStats:
        with self._stats_lock:
            return replace(self._stats)

    def cached_bytes(self) -> int:
        return self._state.read().used_bytes()

    def close(self) -> None:
        self.source.close()

    # --- internals: lookup -------------------------------------------------------------------------

    def _entry_for(self, name: str) -> tuple[ModelEntry, Exception | None]:
        """The manifest's entry for ``name``; when the store cannot be read, the local copy's."""
        try:
            manifest = self.manifest()
        except (ModelUnavailable, ManifestMissing) as exc:
            cached = _resolve_cached(self._state.read(), name)
            if cached is None:
                raise
            log.warning("cache.manifest_unavailable", model=cached.name, error=str(exc), serving="local copy")
            return ModelEntry(name=cached.name, size=cached.size, sha256=cached.sha256, kind=cached.kind), exc
        try:
            return manifest.resolve(name), None
        except ModelNotFound:
            if time.monotonic() - self._manifest_checked < MANIFEST_RECHECK_S:
                raise
            self.refresh_manifest()
            return self.manifest().resolve(name), None

    def _hit(self, entry: ModelEntry) -> CachedModel | None:
        """The verified local copy of ``entry``, touched for LRU; None if there is none."""
        with self._state.transaction() as state:
            cached = state.models.get(entry.name)
            if cached is None:
                return None
            if cached.sha256 != entry.sha256:
                with self._pins_lock:
                    pinned_here = self._pins[entry.name] > 0
                if not pinned_here:
                    return None  # the store has a new version: restage it
                # Restaging would wait for our own pin to end: serve the copy in use for now.
                log.warning("cache.stale_in_use", model=entry.name)
            try:
                size = (self.root / cached.path).stat().st_size
            except FileNotFoundError:
                size = None
            if size != cached.size:
                log.warning("cache.local_copy_lost", model=entry.name, path=cached.path, size=size)
                del state.models[entry.name]
                return None
            now = self._clock()
            cached.last_used = now
            state.record_use(entry.name, now, self._state.history_size)
            return cached

    def _still_cached(self, local: LocalModel) -> bool:
        cached = self._state.read().models.get(local.name)
        return cached is not None and cached.sha256 == local.sha256 and local.path.exists()

    # --- internals: staging ------------------------------------------------------------------------

    def _stage_once(self, entry: ModelEntry) -> CachedModel:
        # One download per model in this process: later callers wait for the first one's future.
        with self._inflight_lock:
            waiting = self._inflight.get(entry.name)
            if waiting is None:
                future: Future[CachedModel] = Future()
                self._inflight[entry.name] = future
        if waiting is not None:
            return waiting.result()
        try:
            cached = self._stage_locked(entry)
            future.set_result(cached)
            return cached
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._inflight_lock:
                del self._inflight[entry.name]

    def _stage_locked(self, entry: ModelEntry) -> CachedModel:
        # One download per model on this machine: the model's lock file, exclusive.
        lock = self._model_lock(entry.name)
        if not lock.acquire(timeout=self._lock_timeout_s):
            raise ModelUnavailable(f"{entry.name} stayed locked by another stager for {self._lock_timeout_s:.0f}s")
        try:
            cached = self._hit(entry)  # another process may have staged it while we waited
            if cached is not None:
                return cached
            self._reserve(entry, self._stager.partial_bytes(entry.name))
            bound = log.bind(model=entry.name, size=entry.size, source=self.source.url)
            bound.info("cache.staging")
            try:
                result = self._stager.stage(entry, self.source)
            except BaseException as exc:
                self._unreserve(entry.name)
                if isinstance(exc, ModelCorrupt):
                    self._count(corrupt=1)
                else:
                    self._count(failures=1)
                bound.warning("cache.stage_failed", error=str(exc), error_type=type(exc).__name__)
                raise
            now = self._clock()
            cached = CachedModel(entry.name, entry.kind, entry.size, entry.sha256, entry.local_path, now, now)
            with self._state.transaction() as state:
                state.models[entry.name] = cached
                state.staging.pop(entry.name, None)
                state.record_use(entry.name, now, self._state.history_size)
            self._count(downloads=1, bytes_downloaded=result.bytes_fetched, resumes=int(result.resumed_from > 0))
            bound.info("cache.staged", seconds=round(result.seconds, 3), resumed_from=result.resumed_from,
                       mb_per_s=round(result.bytes_fetched / 1e6 / max(result.seconds, 1e-9), 1))  # fmt: skip
            return cached
        finally:
            lock.release()

    def _reserve(self, entry: ModelEntry, partial_bytes: int) -> None:
        """Make room for ``entry`` (evicting least recently used models) and hold it."""
        if entry.size > self.budget_bytes:
            raise ModelTooLarge(
                f"{entry.name} ({entry.size} bytes) is larger than the whole budget ({self.budget_bytes})"
            )
        remaining = entry.size - partial_bytes
        with self._state.transaction() as state:
            self._drop_stale_reservations(state)
            others = [r for n, r in state.staging.items() if n != entry.name]
            used = sum(m.size for n, m in state.models.items() if n != entry.name) + sum(r.size for r in others)
            free = self._disk_free(self.root) - sum(r.remaining for r in others)
            need = max(used + entry.size - self.budget_bytes, remaining + self._min_free - free)
            if need > 0:
                self._evict_lru(state, need, keep=entry.name)
            state.staging[entry.name] = Reservation(entry.size, remaining, os.getpid())

    def _unreserve(self, name: str) -> None:
        with self._state.transaction() as state:
            state.staging.pop(name, None)

    def _evict_lru(self, state: State, need: int, keep: str) -> None:
        # Pick victims first and delete only if they free enough: a failed attempt evicts nothing.
        victims: list[tuple[CachedModel, FileLock]] = []
        freed = 0
        try:
            for cached in sorted(state.models.values(), key=lambda m: m.last_used):
                if freed >= need:
                    break
                if cached.name == keep or cached.name in state.staging:
                    continue
                lock = self._model_lock(cached.name)
                if lock.acquire(timeout=0):  # a pin (shared) or a stager (exclusive) holds it otherwise
                    victims.append((cached, lock))
                    freed += cached.size
            if freed < need:
                raise CacheFull(
                    f"no room for {keep}: {need} more bytes needed, {freed} evictable "
                    f"(the rest is in use or being staged)"
                )
            for cached, _ in victims:
                self._remove(state, cached, reason="lru")
        finally:
            for _, lock in victims:
                lock.release()

    def _remove(self, state: State, cached: CachedModel, *, reason: str) -> None:
        (self.root / cached.path).unlink(missing_ok=True)
        del state.models[cached.name]
        self._count(evictions=1, bytes_evicted=cached.size)
        log.info("cache.evicted", model=cached.name, size=cached.size, reason=reason)

    def _drop_stale_reservations(self, state: State) -> None:
        # A reservation outlives a stager that died; a live stager holds the model's lock.
        for name, reservation in list(state.staging.items()):
            lock = self._model_lock(name)
            if not _pid_alive(reservation.pid) or lock.acquire(timeout=0):
                del state.staging[name]
            lock.release()

    # --- internals: misc ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """After a crash: forget models whose file is gone, drop dead reservations and stray partials."""
        with self._state.transaction() as state:
            for cached in list(state.models.values()):
                path = self.root / cached.path
                if not path.is_file() or path.stat().st_size != cached.size:
                    log.warning("cache.local_copy_lost", model=cached.name, path=cached.path)
                    del state.models[cached.name]
            self._drop_stale_reservations(state)
        removed = self._stager.cleanup(self._key_unlocked)
        if removed:
            log.info("cache.partials_removed", files=removed)

    def _key_unlocked(self, key: str) -> bool:
        lock = FileLock(self._locks_dir / f"{key}.lock")
        taken = lock.acquire(timeout=0)
        lock.release()
        return taken

    def _verify_one(self, cached: CachedModel, manifest: Manifest | None) -> VerifyResult:
        lock = self._model_lock(cached.name)
        if not lock.acquire(timeout=0):
            return VerifyResult(cached.name, "in_use", "in use or being staged: not checked")
        try:
            path = self.root / cached.path
            try:
                digest, size = _hash_file(path)
            except FileNotFoundError:
                digest, size = None, None
            if (digest, size) != (cached.sha256, cached.size):
                with self._state.transaction() as state:
                    if state.models.get(cached.name) == cached:
                        self._remove(state, cached, reason="corrupt")
                self._count(corrupt=1)
                log.error("cache.corrupt_removed", model=cached.name, sha256=digest, expected=cached.sha256)
                return VerifyResult(cached.name, "corrupt", f"sha256 {digest} size {size}: removed")
            current = manifest.get(cached.name) if manifest is not None else None
            if current is not None and current.sha256 != cached.sha256:
                return VerifyResult(cached.name, "stale", "the store has another version: restaged on next use")
            return VerifyResult(cached.name, "ok")
        finally:
            lock.release()

    def _manifest_or_none(self) -> Manifest | None:
        try:
            return self.manifest()
        except (ModelUnavailable, ManifestMissing):
            return None

    def _known_size(self, name: str) -> int | None:
        manifest = self._manifest_or_none()
        if manifest is None:
            return None
        try:
            return manifest.resolve(name).size
        except ModelNotFound:
            return None

    def _in_use(self, name: str) -> bool:
        lock = self._model_lock(name)
        taken = lock.acquire(timeout=0)
        lock.release()
        return not taken

    def _model_lock(self, name: str) -> FileLock:
        return FileLock(self._locks_dir / f"{model_key(name)}.lock")

    def _local(self, cached: CachedModel, *, staged: bool, started: float) -> LocalModel:
        return LocalModel(cached.name, self.root / cached.path, cached.size, cached.sha256, cached.kind,
                          staged, _ms_since(started))  # fmt: skip

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)


def _resolve_cached(state: State, name: str) -> CachedModel | None:
    found = match_model(name, state.models)
    return state.models[found] if found is not None else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
