"""No store: only models already on local disk are served (the operator tools without a source)."""

from __future__ import annotations

from collections.abc import Iterator

from sdagent.cache.errors import CacheError, ManifestMissing
from sdagent.cache.manifest import Manifest
from sdagent.cache.sources.base import ModelSource, Sink, StoreFile


class OfflineSource(ModelSource):
    url = "(no source)"

    def read_manifest(self) -> tuple[Manifest, str]:
        raise ManifestMissing("no model store is configured (cache.source)")

    def manifest_version(self) -> str | None:
        return None

    def object_version(self, path: str, size: int) -> str:
        raise CacheError("no model store is configured (cache.source)")

    def fetch(self, path: str, size: int, sink: Sink, *, offset: int = 0, version: str | None = None) -> None:
        raise CacheError("no model store is configured (cache.source)")

    def list_files(self) -> Iterator[StoreFile]:
        raise CacheError("no model store is configured (cache.source)")

    def write_manifest(self, manifest: Manifest) -> None:
        raise CacheError("no model store is configured (cache.source)")
