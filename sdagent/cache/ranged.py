"""Parallel ranged reads delivered in order: what lets a hash be computed while the bytes stream.

Used for a mounted store (``pread`` at offsets: NFS/EFS throughput grows with requests in flight)
and for resuming an S3 download from a partial file (boto3's transfer manager takes no Range).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from sdagent.errors import SdagentError

# At most this much read ahead of the writer, whatever chunk size and concurrency say.
MAX_BUFFER_BYTES = 256 * 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class ShortRead(SdagentError):
    """Raised when a range came back shorter than asked: the file shrank under us."""


def copy_ranges(
    read: Callable[[int, int], bytes],
    start: int,
    end: int,
    sink: Sink,
    *,
    chunk: int,
    concurrency: int,
    thread_name: str = "cache-read",
) -> None:
    """Read ``[start, end)`` as ``read(offset, length)`` calls, ``concurrency`` of them in flight,
    and write each chunk to ``sink`` in order. The first failure stops it and is raised."""
    if start >= end:
        return
    window = max(1, min(concurrency, MAX_BUFFER_BYTES // chunk))
    pending: deque[tuple[int, Future[bytes]]] = deque()
    offset = start
    with ThreadPoolExecutor(window, thread_name_prefix=thread_name) as pool:
        try:
            while pending or offset < end:
                # One more than the pool can run, so a read is queued the moment a thread frees up.
                while offset < end and len(pending) <= window:
                    length = min(chunk, end - offset)
                    pending.append((length, pool.submit(read, offset, length)))
                    offset += length
                length, future = pending.popleft()
                data = future.result()
                if len(data) != length:
                    raise ShortRead(f"asked {length} bytes, got {len(data)}")
                sink.write(data)
        finally:
            for _, future in pending:
                future.cancel()
