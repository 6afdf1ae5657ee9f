"""What the cache knows about its disk, shared by every process that uses the same directory.

``state.json`` holds the verified models (what LRU eviction orders by), the usage history that
prewarm reads, and the reservations of downloads in progress. Every change is a read-modify-write
under an exclusive flock and lands with an atomic rename.

It is not fsynced: losing a recent write to a power cut only forgets touches, or forgets a model
(whose file is then restaged, never served unverified); a state that cannot be read is started
afresh the same way. A model's file is fsynced and renamed into place *before* the state names
it, so the state never vouches for bytes that are not on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from sdagent.cache.locks import FileLock

log = structlog.get_logger(__name__)

STATE_VERSION = 1
DEFAULT_HISTORY_SIZE = 500  # names remembered for prewarm; a few KB


@dataclass
class CachedModel:
    """A verified model on local disk."""

    name: str
    kind: str
    size: int
    sha256: str
    path: str  # relative to the cache directory
    staged_at: float
    last_used: float


@dataclass
class Usage:
    count: int = 0
    last_used: float = 0.0


@dataclass
class Reservation:
    """Room held for a download in progress: ``size`` in the budget, ``remaining`` on the disk."""

    size: int
    remaining: int
    pid: int


@dataclass
class State:
    models: dict[str, CachedModel] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)
    staging: dict[str, Reservation] = field(default_factory=dict)

    def used_bytes(self) -> int:
        return sum(model.size for model in self.models.values())

    def record_use(self, name: str, now: float, history_size: int) -> None:
        usage = self.usage.setdefault(name, Usage())
        usage.count += 1
        usage.last_used = now
        if len(self.usage) > history_size:
            # The least recently used names go first.
            for stale in sorted(self.usage, key=lambda n: self.usage[n].last_used)[: len(self.usage) - history_size]:
                del self.usage[stale]

    def most_used(self, count: int) -> list[str]:
        ranked = sorted(self.usage.items(), key=lambda item: (-item[1].count, -item[1].last_used, item[0]))
        return [name for name, _ in ranked[:count]]


class StateStore:
    """``state.json`` and its lock file."""

    def __init__(self, path: Path, lock_path: Path, *, history_size: int = DEFAULT_HISTORY_SIZE) -> None:
        self._path = path
        self._lock_path = lock_path
        self.history_size = history_size

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """The state under an exclusive lock; written back when the block ends without an error."""
        with FileLock(self._lock_path):
            state = self._load()
            yield state
            self._save(state)

    def read(self) -> State:
        """A snapshot of the state."""
        lock = FileLock(self._lock_path)
        lock.acquire(shared=True)
        try:
            return self._load()
        finally:
            lock.release()

    def _load(self) -> State:
        try:
            document = json.loads(self._path.read_bytes())
            return State(
                models={name: CachedModel(**value) for name, value in document.get("models", {}).items()},
                usage={name: Usage(**value) for name, value in document.get("usage", {}).items()},
                staging={name: Reservation(**value) for name, value in document.get("staging", {}).items()},
            )
        except FileNotFoundError:
            return State()
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("cache.state_unreadable", path=str(self._path), error=str(exc))
            return State()

    def _save(self, state: State) -> None:
        document = {
            "version": STATE_VERSION,
            "models": {name: asdict(value) for name, value in sorted(state.models.items())},
            "usage": {name: asdict(value) for name, value in sorted(state.usage.items())},
            "staging": {name: asdict(value) for name, value in sorted(state.staging.items())},
        }
        temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_text(json.dumps(document, indent=1))
            os.replace(temporary, self._path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
