"""Test doubles for the model cache: a store on disk in one call, and a source wrapper that counts,
slows down or cuts downloads. Used by the tests and the benchmark; nothing here runs in the agent.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdagent.cache.errors import ModelUnavailable
from sdagent.cache.manifest import KIND_DIRS, Manifest, ModelEntry
from sdagent.cache.sources.base import ModelSource, Sink, Stoppable, StoreFile
from sdagent.cache.sources.directory import DirectorySource


def model_bytes(name: str, size: int) -> bytes:
    """Deterministic, incompressible content for a test model (the same for the same name)."""
    return random.Random(name).randbytes(size)


def make_store(root: Path, models: Mapping[str, bytes], *, kinds: Mapping[str, str] | None = None) -> Manifest:
    """Write ``models`` (name -> bytes) under ``root`` (LoRAs etc. in their kind folder) and a
    ``manifest.json`` listing them; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, data in models.items():
        kind = (kinds or {}).get(name, "checkpoint")
        path = name if kind == "checkpoint" else f"{KIND_DIRS[kind]}/{name}"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        entries.append(ModelEntry(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), kind=kind,
                                  path=None if path == name else path))  # fmt: skip
    manifest = Manifest(entries)
    DirectorySource(root).write_manifest(manifest)
    return manifest


@dataclass
class Fetch:
    path: str
    offset: int


@dataclass
class InstrumentedSource(ModelSource):
    """Wraps a source: records every fetch, can sleep per chunk written and cut a download short.

    ``fail_after``: the first fetch raises ModelUnavailable once it has passed this many bytes.
    """

    inner: ModelSource
    delay_per_write_s: float = 0.0
    fail_after: int | None = None
    fetches: list[Fetch] = field(default_factory=list)
    on_fetch: Callable[[Fetch], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    def read_manifest(self):
        return self.inner.read_manifest()

    def manifest_version(self):
        return self.inner.manifest_version()

    def object_version(self, path: str, size: int) -> str:
        return self.inner.object_version(path, size)

    def fetch(self, path: str, size: int, sink: Sink, *, offset: int = 0, version: str | None = None) -> None:
        fetch = Fetch(path, offset)
        with self._lock:
            self.fetches.append(fetch)
            fail_after, self.fail_after = self.fail_after, None
        if self.on_fetch is not None:
            self.on_fetch(fetch)
        self.inner.fetch(
            path, size, _SlowSink(sink, self.delay_per_write_s, fail_after), offset=offset, version=version
        )

    def list_files(self) -> Iterator[StoreFile]:
        return self.inner.list_files()

    def write_manifest(self, manifest: Manifest) -> None:
        self.inner.write_manifest(manifest)

    def observe(self, on_event) -> Stoppable | None:
        return self.inner.observe(on_event)


class _SlowSink:
    def __init__(self, sink: Sink, delay_s: float, fail_after: int | None) -> None:
        self._sink = sink
        self._delay_s = delay_s
        self._fail_after = fail_after
        self._passed = 0

    def write(self, data) -> object:
        if self._fail_after is not None and self._passed >= self._fail_after:
            raise ModelUnavailable("connection cut (injected)")
        if self._delay_s:
            time.sleep(self._delay_s)
        self._passed += len(data)
        return self._sink.write(data)

    def seekable(self) -> bool:
        return False


def enospc_after(limit: int) -> Callable[[int, memoryview], int]:
    """An ``os.write`` that fails with ENOSPC once ``limit`` bytes were written through it."""
    written = 0
    lock = threading.Lock()

    def write(fd: int, data: memoryview) -> int:
        nonlocal written
        with lock:
            if written + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += len(data)
        return os.write(fd, data)

    return write
