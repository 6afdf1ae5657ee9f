"""The interface between the cache and a model store.

A store has a ``manifest.json`` at its root and model files under it, each addressed by its
path relative to the root. The cache never knows which kind of store it reads.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from sdagent.cache.manifest import Manifest


class Sink(Protocol):
    """Receives a file's bytes in order."""

    def write(self, data: bytes) -> object: ...


@dataclass(frozen=True)
class StoreFile:
    """A file in the store, as listed for ``sdagent cache index``."""

    path: str  # relative to the store's root, '/'-separated
    size: int
    version: str  # changes whenever the file's bytes may have: S3 ETag, or size and mtime


class Stoppable(Protocol):
    def stop(self) -> None: ...


class ModelSource(abc.ABC):
    """A store of models. Failures are cache errors: ModelUnavailable when worth a later retry
    (unreachable, 5xx, a mount gone), ModelNotFound, ManifestMissing, CacheError for the rest."""

    url: str  # for logs and the command line: s3://bucket/prefix or the directory

    @abc.abstractmethod
    def read_manifest(self) -> tuple[Manifest, str]:
        """The store's manifest and its version (compare with :meth:`manifest_version`)."""

    @abc.abstractmethod
    def manifest_version(self) -> str | None:
        """A cheap token that changes when ``manifest.json`` does; None when there is none."""

    @abc.abstractmethod
    def object_version(self, path: str, size: int) -> str:
        """The version of the file at ``path``; ModelCorrupt when its size is not ``size``."""

    @abc.abstractmethod
    def fetch(self, path: str, size: int, sink: Sink, *, offset: int = 0, version: str | None = None) -> None:
        """Write bytes ``[offset, size)`` of the file at ``path`` to ``sink``, in order.

        ``version`` (from :meth:`object_version`) lets a resume refuse a file that changed."""

    @abc.abstractmethod
    def list_files(self) -> Iterator[StoreFile]:
        """Every file under the root except the manifest."""

    @abc.abstractmethod
    def write_manifest(self, manifest: Manifest) -> None:
        """Replace ``manifest.json`` (atomically where the store allows)."""

    def observe(self, on_event: Callable[[str], None]) -> Stoppable | None:
        """Start calling ``on_event(relative_path)`` when a file changes, if the store can tell;
        None when only polling :meth:`manifest_version` can (S3). The caller stops it."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most implementations hold nothing to release
        """Release clients and threads; the default has nothing to release."""
