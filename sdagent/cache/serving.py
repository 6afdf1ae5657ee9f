"""What the job loop asks of the model cache: a job's model on local disk, kept there while it runs.

:class:`CachedModels` serves models through a :class:`~sdagent.cache.cache.ModelCache`;
:class:`UncachedModels` is the stand-in when ``[cache]`` names no store (the WebUI's own folders
are used as they are). Both tell the loop when the WebUI must rescan its model folders: after a
model was staged, or when the store's manifest changed. The rescan itself happens on the job
thread, the only thread that talks to the backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import structlog

from sdagent.cache.cache import ModelCache
from sdagent.cache.errors import ModelUnavailable
from sdagent.cache.watch import ModelsChanged
from sdagent.errors import ModelNotFound
from sdagent.metrics.jobs import JobMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """The model a job runs on: its name as the WebUI lists it, and what staging it cost."""

    name: str
    stage_ms: float | None = None  # None: nothing was staged for this job (a hit, or no cache)


class UncachedModels:
    """No model cache: the job's model name goes to the WebUI unchanged."""

    @contextlib.contextmanager
    def use(self, model: str) -> Iterator[ServedModel]:
        yield ServedModel(model)

    def take_rescan(self) -> bool:
        return False


class CachedModels:
    """Models staged by the cache, pinned against eviction while a job uses them."""

    def __init__(
        self,
        cache: ModelCache,
        recorder: JobMetrics | None = None,
        webui_models: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._cache = cache
        self._recorder = recorder or JobMetrics(enabled=False)
        self._webui_models = webui_models  # what the WebUI lists now (its health probe)
        self._rescan = threading.Event()

    @contextlib.contextmanager
    def use(self, model: str) -> Iterator[ServedModel]:
        with contextlib.ExitStack() as pinned:
            try:
                local = pinned.enter_context(self._cache.use(model))
            except ModelNotFound:
                # Not in the store: the WebUI's own folders (the image's models) may have it; if
                # they do not either, the switch fails with the same reason, model_not_found.
                local = None
                log.info("model.not_in_store", model=model)
            except ModelUnavailable:
                # The store cannot be read, so whether it lists the model is unknown: a model of
                # the WebUI's own (baked into the image) still runs; anything else is retried.
                if model not in self._webui_models():
                    raise
                local = None
                log.warning("model.store_unavailable_webui_copy_used", model=model)
            if local is None:
                yield ServedModel(model)
                return
            self._recorder.model_cache(hit=not local.staged)
            if local.staged:
                self._rescan.set()  # the WebUI has not seen the new file yet
                log.info("model.staged", model=local.name, stage_ms=round(local.stage_ms, 1), bytes=local.size)
            yield ServedModel(local.name, round(local.stage_ms, 3) if local.staged else None)

    def take_rescan(self) -> bool:
        """True once after a model was staged or the store changed: the WebUI should rescan."""
        if not self._rescan.is_set():
            return False
        self._rescan.clear()
        return True

    def request_rescan(self) -> None:
        """Models were staged outside a job (prewarm): rescan before the next job."""
        self._rescan.set()

    def models_changed(self, change: ModelsChanged) -> None:
        """From the store watcher's thread: rescan before the next job (files not yet in the
        manifest cannot be served, so they need none)."""
        if change.added or change.changed or change.removed:
            self._rescan.set()
