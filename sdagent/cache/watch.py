"""Watching the store for new or changed models.

The manifest is the store's list of models, so a change to it is what counts: its version (S3
ETag; size, mtime and inode of the file) is polled every ``interval_s``, and a mounted store also
wakes the watcher through watchdog (inotify) events at once. Polling stays on for mounted stores
because inotify never sees changes another NFS/EFS client makes.

Model files that appear in a mounted store without being in the manifest are reported as
``unindexed``: they cannot be served until ``sdagent cache index`` hashes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from sdagent.cache.cache import ModelCache
from sdagent.cache.manifest import MANIFEST_NAME, ManifestDiff, is_model_file
from sdagent.cache.sources.base import Stoppable
from sdagent.errors import SdagentError

log = structlog.get_logger(__name__)

# After an event, wait this long for the rest of a burst (an index run rewrites the manifest once,
# but a copy into the store raises many events) before reading the manifest.
DEBOUNCE_S = 0.5
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelsChanged:
    """What changed in the store since the last look."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unindexed: tuple[str, ...] = ()  # store paths of model files the manifest does not list

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.unindexed)


class ManifestWatcher:
    """Calls ``on_models_changed(ModelsChanged)`` from its own thread when the store changes."""

    def __init__(
        self,
        cache: ModelCache,
        on_models_changed: Callable[[ModelsChanged], None],
        *,
        interval_s: float = 60.0,
        use_events: bool = True,
    ) -> None:
        self._cache = cache
        self._callback = on_models_changed
        self._interval_s = interval_s
        self._use_events = use_events
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._new_files: set[str] = set()
        self._files_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._observer: Stoppable | None = None

    def start(self) -> None:
        """Read the manifest as the baseline, subscribe to the store's events, start polling."""
        try:
            self._cache.manifest()
        except SdagentError as exc:
            log.warning("cache.watch_baseline_failed", source=self._cache.source.url, error=str(exc))
        if self._use_events:
            try:
                self._observer = self._cache.source.observe(self._on_event)
            except OSError as exc:
                # The mount is not there (yet), or the inotify watch limit is reached: polling
                # still sees every change, a poll interval later.
                log.warning("cache.watch_events_unavailable", source=self._cache.source.url, error=str(exc))
        self._thread = threading.Thread(target=self._run, name="cache-watch", daemon=True)
        self._thread.start()
        log.info("cache.watch_started", source=self._cache.source.url, interval_s=self._interval_s,
                 events=self._observer is not None)  # fmt: skip

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            join = getattr(self._observer, "join", None)
            if join is not None:
                join(STOP_TIMEOUT_S)
            self._observer = None
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None

    def check(self) -> ModelsChanged:
        """Look once: re-read the manifest if its version changed; call back if anything did."""
        version = self._cache.source.manifest_version()
        diff = ManifestDiff()
        if version is None:
            log.warning("cache.manifest_missing", source=self._cache.source.url)
        elif version != self._cache.manifest_version:
            diff = self._cache.refresh_manifest()
        with self._files_lock:
            new_files, self._new_files = self._new_files, set()
        manifest = self._cache.manifest() if version is not None else None
        listed = {entry.source_path for entry in manifest} if manifest is not None else set()
        change = ModelsChanged(diff.added, diff.changed, diff.removed, tuple(sorted(new_files - listed)))
        if change:
            log.info("cache.models_changed", added=list(change.added), changed=list(change.changed),
                     removed=list(change.removed), unindexed=list(change.unindexed))  # fmt: skip
            try:
                self._callback(change)
            except Exception:
                log.exception("cache.models_changed_callback_failed")
        return change

    def _on_event(self, relative_path: str) -> None:
        if relative_path == MANIFEST_NAME:
            self._wake.set()
        elif is_model_file(relative_path):
            with self._files_lock:
                self._new_files.add(relative_path)
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            woken = self._wake.wait(self._interval_s)
            if self._stopping.is_set():
                return
            if woken:
                self._stopping.wait(DEBOUNCE_S)
                self._wake.clear()
            try:
                self.check()
            except SdagentError as exc:
                # The next poll tries again; the interval is the backoff.
                log.warning("cache.watch_failed", source=self._cache.source.url, error=str(exc))
