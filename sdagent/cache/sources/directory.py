"""A mounted store: EFS, an S3 File Gateway share, or any directory.

Two ways to copy, chosen by the store's file system (``copy_mode="auto"``):

* network and FUSE file systems (NFS/EFS, CIFS, s3fs, Mountpoint): ``pread`` calls at offsets,
  several in flight (:func:`~sdagent.cache.ranged.copy_ranges`), because their throughput grows
  with requests in flight (AWS's EFS guidance);
* local file systems: the kernel copies (``sendfile``, as ``cp`` does with copy_file_range) and
  the writer hashes each chunk from the destination's page cache, in memory. On a local disk the
  user-space copy costs more than the parallelism gains (docs/model-cache.md, figures).

Either way the copy is sequential in the destination and a resume starts at an offset.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sdagent.cache.errors import CacheError, ManifestMissing, ModelCorrupt, ModelNotFound, ModelUnavailable
from sdagent.cache.manifest import MANIFEST_NAME, Manifest
from sdagent.cache.ranged import ShortRead, copy_ranges
from sdagent.cache.sources.base import ModelSource, Sink, Stoppable, StoreFile

log = structlog.get_logger(__name__)

DEFAULT_CHUNK = 8 * 1024 * 1024
MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT_CONCURRENCY = 4
# What a mount that went away or a server that stopped answering looks like: worth a retry.
_UNREACHABLE_ERRNOS = frozenset(
    {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH,
     errno.ENETUNREACH, errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN, errno.ENODEV}
)  # fmt: skip


class DirectorySource(ModelSource):
    """Models under ``root``, a directory on any mounted file system."""

    def __init__(
        self,
        root: Path,
        *,
        chunk: int = DEFAULT_CHUNK,
        concurrency: int = DEFAULT_CONCURRENCY,
        copy_mode: Literal["auto", "kernel", "pread"] = "auto",
        mountinfo: Path = MOUNTINFO,
    ) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self._chunk = chunk
        self._concurrency = concurrency
        if copy_mode == "auto":
            fs_type = filesystem_type(self.root, mountinfo)
            copy_mode = "pread" if fs_type is None or _is_network(fs_type) else "kernel"
        self.copy_mode = copy_mode

    def read_manifest(self) -> tuple[Manifest, str]:
        path = self.root / MANIFEST_NAME
        try:
            with path.open("rb") as handle:
                version = _version(os.fstat(handle.fileno()))
                return Manifest.loads(handle.read()), version
        except FileNotFoundError:
            self._check_root()
            raise ManifestMissing(
                f"no {MANIFEST_NAME} in {self.root} (build one with: sdagent cache index {self.root})"
            ) from None
        except OSError as exc:
            raise self._error(exc, MANIFEST_NAME) from exc

    def manifest_version(self) -> str | None:
        try:
            return _version(os.stat(self.root / MANIFEST_NAME))
        except FileNotFoundError:
            self._check_root()
            return None
        except OSError as exc:
            raise self._error(exc, MANIFEST_NAME) from exc

    def object_version(self, path: str, size: int) -> str:
        try:
            stat = os.stat(self._path(path))
        except OSError as exc:
            raise self._error(exc, path) from exc
        if stat.st_size != size:
            raise ModelCorrupt(f"{self.root / path} is {stat.st_size} bytes, the manifest says {size}")
        return _version(stat)

    def fetch(self, path: str, size: int, sink: Sink, *, offset: int = 0, version: str | None = None) -> None:
        try:
            fd = os.open(self._path(path), os.O_RDONLY | os.O_CLOEXEC)
            changed = version is not None and _version(os.fstat(fd)) != version
        except OSError as exc:
            raise self._error(exc, path) from exc

        def read(at: int, length: int) -> bytes:
            try:
                return _pread_full(fd, length, at)
            except OSError as exc:
                raise self._error(exc, path) from exc

        copy_from = getattr(sink, "copy_from", None) if self.copy_mode == "kernel" else None
        try:
            if changed:
                raise ModelUnavailable(f"{self.root / path} changed since it was looked at; try again")
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
            if copy_from is not None:
                self._copy_in_kernel(fd, path, copy_from, offset, size)
            else:
                # An OSError that gets out of copy_ranges is the sink's (the local disk's): not mapped.
                copy_ranges(read, offset, size, sink, chunk=self._chunk, concurrency=self._concurrency)
        except ShortRead as exc:
            raise ModelCorrupt(f"{self.root / path} is shorter than the manifest says: {exc}") from None
        finally:
            os.close(fd)

    def _copy_in_kernel(self, fd: int, path: str, copy_from, offset: int, size: int) -> None:
        at = offset
        while at < size:
            length = min(self._chunk, size - at)
            try:
                copy_from(fd, at, length)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # the local disk is full: the stager's error, not the store's
                raise self._error(exc, path) from exc
            at += length

    def list_files(self) -> Iterator[StoreFile]:
        try:
            for directory, subdirectories, files in os.walk(self.root, onerror=_raise):
                subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
                for name in sorted(files):
                    full = Path(directory, name)
                    relative = full.relative_to(self.root).as_posix()
                    if relative == MANIFEST_NAME or name.startswith("."):
                        continue
                    stat = full.stat()
                    yield StoreFile(relative, stat.st_size, _version(stat))
        except OSError as exc:
            raise self._error(exc, "") from exc

    def write_manifest(self, manifest: Manifest) -> None:
        path = self.root / MANIFEST_NAME
        temporary = self.root / f".{MANIFEST_NAME}.{secrets.token_hex(4)}.tmp"
        try:
            with temporary.open("w") as handle:
                handle.write(manifest.dumps())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)  # readers see the old manifest or the new one
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise self._error(exc, MANIFEST_NAME) from exc

    def observe(self, on_event: Callable[[str], None]) -> Stoppable | None:
        # inotify sees changes made through this machine only: on NFS/EFS another client's
        # changes show up through the watcher's polling of manifest_version() instead.
        observer = Observer()
        observer.schedule(_Forward(self.root, on_event), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def _path(self, relative: str) -> Path:
        return self.root / relative

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise ModelUnavailable(f"the model store {self.root} is not there (not mounted?)")

    def _error(self, exc: OSError, path: str) -> Exception:
        if isinstance(exc, FileNotFoundError):
            self._check_root()
            return ModelNotFound(f"{self.root / path} is not in the store")
        if exc.errno in _UNREACHABLE_ERRNOS:
            return ModelUnavailable(f"reading {self.root / path}: {exc.strerror}")
        return CacheError(f"reading {self.root / path}: {exc.strerror or exc}")


class _Forward(FileSystemEventHandler):
    def __init__(self, root: Path, on_event: Callable[[str], None]) -> None:
        self._root = root
        self._on_event = on_event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                path = Path(os.fsdecode(raw))
                if path.is_relative_to(self._root):
                    self._on_event(path.relative_to(self._root).as_posix())


def filesystem_type(path: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the file system ``path`` is on (``ext4``, ``nfs4``, ``fuse.s3fs``...), from
    /proc/self/mountinfo; None when it cannot be told."""
    try:
        target = os.path.realpath(path)
        best, best_type = "", None
        for line in mountinfo.read_text().splitlines():
            fields = line.split()
            separator = fields.index("-")
            mount_point = fields[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, best_type = mount_point, fields[separator + 1]
        return best_type
    except (OSError, ValueError, IndexError):
        return None


def _is_network(fs_type: str) -> bool:
    return fs_type.startswith(("nfs", "fuse", "cifs", "smb", "9p", "ceph", "lustre", "glusterfs", "virtiofs"))


def _version(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]  # a short read before EOF (NFS may split): keep reading
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _raise(exc: OSError) -> None:
    raise exc
