"""Staging one model: download into a partial file on local disk, hash while writing, verify,
fsync, rename into place. A partial file is never where the WebUI looks, so nothing half-written
or unverified is ever visible; an interrupted download leaves its partial file and a record that
lets the next attempt resume it.

Layout under the cache's control directory (``<cache>/.sdagent/staging``)::

    <key>.json                  the record: name, sha256, size, store version, partial file
    <key>.<pid>-<random>.partial  the bytes so far; unique so two writers can never share one
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import cast
from urllib.parse import quote

import structlog

from sdagent.cache.errors import CacheFull, ModelCorrupt, ModelNotFound
from sdagent.cache.manifest import ModelEntry
from sdagent.cache.sources.base import ModelSource
from sdagent.errors import SdagentError

log = structlog.get_logger(__name__)

READ_CHUNK = 8 * 1024 * 1024
WRITEBACK_CHUNK = 32 * 1024 * 1024
HASH_QUEUE_DEPTH = 16  # chunks written but not yet hashed: bounds the memory the overlap costs
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

WriteFn = Callable[[int, memoryview], int]


def model_key(name: str) -> str:
    """A file-name-safe, unique key for a model name (names may contain ``/``)."""
    quoted = quote(name, safe="")
    # quote() never emits a bare "%%", so hashed keys cannot collide with quoted ones.
    return quoted if len(quoted) <= 180 else "%%" + sha256(name.encode()).hexdigest()


class HashingWriter:
    """Appends to a file descriptor and hashes every byte appended, in a second thread.

    Bytes handed to :meth:`write` are hashed from memory as they pass; bytes the kernel copied
    (:meth:`copy_from`) are hashed from this file's page cache right after they were written,
    still in memory. Either way nothing is read back from disk, and what is hashed is what will
    be fsynced. The second thread also starts the writeback of what it has hashed; hashlib
    releases the GIL on large buffers, so it runs beside the copy.
    """

    def __init__(self, fd: int, *, write: WriteFn = os.write, start: int = 0) -> None:
        self._fd = fd
        self._flusher = _Writeback(fd, start)
        self._write = write
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[tuple[str, object] | None] = queue.Queue(HASH_QUEUE_DEPTH)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash_loop, name="cache-hash", daemon=True)
        self._thread.start()
        self._done = False
        self.written = 0

    def write(self, data) -> int:
        # A transfer client may lend a view of a buffer it reuses after this call: keep a copy.
        chunk = data if isinstance(data, bytes) else bytes(data)
        with self._lock:
            view = memoryview(chunk)
            while view:
                view = view[self._write(self._fd, view) :]
            self._queue.put(("written", chunk))
            self.written += len(chunk)
        return len(chunk)

    def copy_from(self, source_fd: int, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``source_fd`` from ``offset``, copied by the kernel (sendfile,
        as cp does: no trip through user space); they are hashed from the page cache."""
        with self._lock:
            start = os.lseek(self._fd, 0, os.SEEK_CUR)
            copied = 0
            while copied < count:
                sent = os.sendfile(self._fd, source_fd, offset + copied, count - copied)
                if sent == 0:
                    break  # the source ended early: the size check reports it
                copied += sent
            if copied:
                self._queue.put(("copied", (start, copied)))
                self.written += copied

    def seekable(self) -> bool:
        # Not seekable: boto3's transfer manager then hands the parts over in order.
        return False

    def hash_only(self, data: bytes) -> None:
        """Feed bytes already on disk (a partial being resumed) to the hash."""
        self._queue.put(("kept", data))

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._queue.put(None)
            self._thread.join()

    def _hash_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain, so the writer never blocks on a full queue
            kind, payload = item
            try:
                if kind == "copied":
                    start, length = cast(tuple[int, int], payload)
                    chunk = os.pread(self._fd, length, start)  # the page cache: just written
                    if len(chunk) != length:
                        raise OSError(errno.EIO, f"read back {len(chunk)} of {length} bytes")
                else:
                    chunk = cast(bytes, payload)
                self._hash.update(chunk)
                if kind != "kept":
                    self._flusher.wrote(len(chunk))
            except OSError as exc:
                self._error = exc


class _Writeback:
    """Starts writeback of each range as soon as it is written (sync_file_range, Linux), so the disk
    writes while the store is read and the final fsync has little left to do. It does not wait:
    the kernel's dirty-page throttling bounds the memory. The pages stay cached, so the WebUI's
    first load of a fresh model reads memory, not the disk."""

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._flushed = start  # writeback has been started for the bytes before this offset
        self._written = start

    def wrote(self, count: int) -> None:
        self._written += count
        if _sync_file_range is not None and self._written - self._flushed >= WRITEBACK_CHUNK:
            _sync_file_range(self._fd, self._flushed, self._written - self._flushed, _SFR_WRITE)
            self._flushed = self._written


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE, <linux/fs.h>
_sync_file_range = _load_sync_file_range()


@dataclass
class PartialRecord:
    name: str
    sha256: str
    size: int
    version: str
    partial: str  # file name in the staging directory


@dataclass(frozen=True)
class StageResult:
    bytes_fetched: int
    resumed_from: int  # 0: a fresh download
    seconds: float


class _ResumedCorrupt(SdagentError):
    """A resumed download did not verify: the kept bytes may be bad; start over once."""


class Stager:
    """Stages models into place under ``root``; the caller holds the model's exclusive lock."""

    def __init__(self, root: Path, staging_dir: Path, *, write: WriteFn = os.write) -> None:
        self._root = root
        self._dir = staging_dir
        self._write = write

    def stage(self, entry: ModelEntry, source: ModelSource) -> StageResult:
        """Make ``root/entry.local_path`` a verified copy of the store's file.

        Raises ModelCorrupt (size or sha256 differ: partial removed), CacheFull (disk full:
        partial removed), ModelNotFound, and ModelUnavailable (partial kept for a resume).
        """
        started = time.perf_counter()
        version = source.object_version(entry.source_path, entry.size)
        try:
            partial, offset = self._resume_point(entry, version)
            try:
                fetched = self._download(entry, source, version, partial, offset)
            except _ResumedCorrupt:
                log.warning("cache.resume_discarded", model=entry.name, resumed_from=offset)
                self._discard(entry.name)
                partial, offset = self._resume_point(entry, version)
                fetched = self._download(entry, source, version, partial, offset)
            self._commit(entry, partial)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                self._discard(entry.name)
                raise CacheFull(f"disk full while staging {entry.name}: {exc.strerror}") from exc
            raise
        except (ModelCorrupt, ModelNotFound):
            self._discard(entry.name)
            raise
        return StageResult(fetched, offset, time.perf_counter() - started)

    def cleanup(self, may_touch: Callable[[str], bool]) -> int:
        """Remove partial files without a record and records without a partial file, for names
        ``may_touch`` allows (nobody is staging them); returns how many files went."""
        removed = 0
        records = {p.name.removesuffix(".json"): p for p in self._dir.glob("*.json")}
        partials = list(self._dir.glob("*.partial"))
        kept = set()
        for key, path in records.items():
            record = self._read_record_file(path)
            if record is not None and (self._dir / record.partial).exists():
                kept.add(record.partial)
            elif may_touch(key):
                path.unlink(missing_ok=True)
                removed += 1
        for path in partials:
            key = path.name.rsplit(".", 2)[0]
            if path.name not in kept and may_touch(key):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def partial_bytes(self, name: str) -> int:
        """Bytes kept from an interrupted download of ``name`` (0 when none)."""
        record = self._read_record(name)
        if record is None:
            return 0
        try:
            return (self._dir / record.partial).stat().st_size
        except FileNotFoundError:
            return 0

    # --- steps -------------------------------------------------------------------------------

    def _resume_point(self, entry: ModelEntry, version: str) -> tuple[Path, int]:
        record = self._read_record(entry.name)
        if record is not None:
            partial = self._dir / record.partial
            same = (record.sha256, record.size, record.version) == (entry.sha256, entry.size, version)
            try:
                offset = partial.stat().st_size
            except FileNotFoundError:
                same = False
            if same and offset <= entry.size:
                if offset:
                    log.info("cache.resuming", model=entry.name, offset=offset, size=entry.size)
                return partial, offset
            self._discard(entry.name)  # the store's file changed or the partial is gone
        partial = self._dir / f"{model_key(entry.name)}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        self._write_record(PartialRecord(entry.name, entry.sha256, entry.size, version, partial.name))
        return partial, 0

    def _download(self, entry: ModelEntry, source: ModelSource, version: str, partial: Path, offset: int) -> int:
        fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC)  # read too: copy_from hashes what it wrote
        writer = HashingWriter(fd, write=self._write, start=offset)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            if offset:
                self._hash_prefix(partial, offset, writer)
            source.fetch(entry.source_path, entry.size, writer, offset=offset, version=version)
            digest = writer.hexdigest()
            total = offset + writer.written
            if total != entry.size:
                raise ModelCorrupt(f"{entry.name}: got {total} bytes, the manifest says {entry.size}")
            if digest != entry.sha256:
                if offset:
                    raise _ResumedCorrupt()
                raise ModelCorrupt(f"{entry.name}: sha256 {digest} differs from the manifest's {entry.sha256}")
            os.fsync(fd)  # the bytes are on disk before the name says they are there
            return writer.written
        finally:
            writer.close()
            os.close(fd)

    def _hash_prefix(self, partial: Path, length: int, writer: HashingWriter) -> None:
        # hashlib's state cannot be saved, so a resume hashes the kept bytes once, from local disk.
        with partial.open("rb", buffering=0) as handle:
            remaining = length
            while remaining:
                chunk = handle.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise _ResumedCorrupt()
                writer.hash_only(chunk)
                remaining -= len(chunk)

    def _commit(self, entry: ModelEntry, partial: Path) -> None:
        target = self._root / entry.local_path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)  # atomic: the old version or the new one, never a mix
        fsync_directory(target.parent)
        self._record_path(entry.name).unlink(missing_ok=True)

    def _discard(self, name: str) -> None:
        record = self._read_record(name)
        if record is not None:
            (self._dir / record.partial).unlink(missing_ok=True)
        self._record_path(name).unlink(missing_ok=True)

    # --- records -------------------------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self._dir / f"{model_key(name)}.json"

    def _read_record(self, name: str) -> PartialRecord | None:
        return self._read_record_file(self._record_path(name))

    def _read_record_file(self, path: Path) -> PartialRecord | None:
        try:
            return PartialRecord(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("cache.partial_record_unreadable", path=str(path), error=str(exc))
            return None

    def _write_record(self, record: PartialRecord) -> None:
        path = self._record_path(record.name)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_text(json.dumps(asdict(record)))
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
