"""Building a store's manifest: list its model files and hash each one (``sdagent cache index``).

A mounted store is read with parallel ``pread``s; an S3 store is streamed through the same parallel
ranged download the cache uses, hashed in memory, never written to disk. Entries of the previous
manifest whose file has the same path, size and version are kept without hashing again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from sdagent.cache.errors import CacheError, ModelUnavailable
from sdagent.cache.manifest import Manifest, ModelEntry, is_model_file, kind_and_name, name_problem
from sdagent.cache.sources.base import ModelSource, StoreFile

log = structlog.get_logger(__name__)

DEFAULT_WORKERS = 2  # files hashed at once; each read is parallel already


class _Hasher:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False


def build_manifest(
    source: ModelSource,
    *,
    reuse: bool = True,
    workers: int = DEFAULT_WORKERS,
    on_file: Callable[[ModelEntry, bool], None] | None = None,
) -> Manifest:
    """A manifest of every model file in ``source``. ``on_file(entry, hashed)`` reports progress.

    Raises CacheError when two files would get the same model name (names are unique across kinds).
    """
    previous = _previous(source) if reuse else None
    files = [f for f in source.list_files() if is_model_file(f.path) and not name_problem(f.path)]
    entries: dict[str, ModelEntry] = {}
    to_hash: list[tuple[StoreFile, str, str]] = []
    seen: set[str] = set()
    for store_file in files:
        kind, name = kind_and_name(store_file.path)
        if name in seen:
            raise CacheError(f"two files would be model {name!r}; rename one ({store_file.path})")
        seen.add(name)
        old = previous.get(name) if previous is not None else None
        if old is not None and (old.source_path, old.size, old.version) == (
            store_file.path,
            store_file.size,
            store_file.version,
        ):
            entry = old.model_copy(update={"kind": kind})
            entries[name] = entry
            if on_file:
                on_file(entry, False)
        else:
            to_hash.append((store_file, kind, name))

    def hash_one(item: tuple[StoreFile, str, str]) -> ModelEntry:
        store_file, kind, name = item
        started = time.perf_counter()
        hasher = _Hasher()
        source.fetch(store_file.path, store_file.size, hasher, version=store_file.version)
        if hasher.size != store_file.size:
            raise ModelUnavailable(f"{store_file.path} changed while it was hashed; index again")
        entry = ModelEntry(name=name, kind=kind, size=store_file.size, sha256=hasher.digest.hexdigest(),
                           path=None if store_file.path == name else store_file.path,
                           version=store_file.version)  # fmt: skip
        seconds = time.perf_counter() - started
        log.info("cache.indexed", model=name, size=store_file.size, seconds=round(seconds, 2),
                 mb_per_s=round(store_file.size / 1e6 / max(seconds, 1e-9), 1))  # fmt: skip
        if on_file:
            on_file(entry, True)
        return entry

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cache-index") as pool:
        for entry in pool.map(hash_one, to_hash):
            entries[entry.name] = entry
    return Manifest(entries.values())


def _previous(source: ModelSource) -> Manifest | None:
    try:
        return source.read_manifest()[0]
    except CacheError:  # none yet, or unreadable: hash everything
        return None
