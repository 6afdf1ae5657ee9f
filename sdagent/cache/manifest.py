"""The store's list of models: name, size, sha256 and kind of every file the cache may stage.

``manifest.json`` at the store's root::

    {"version": 1, "models": [
      {"name": "sd_xl_base_1.0.safetensors", "kind": "checkpoint", "size": 6938078334,
       "sha256": "31e35c80...", "path": "Stable-diffusion/sd_xl_base_1.0.safetensors"}]}

``path`` is where the file lives under the store's root (default: ``name``); ``version`` is the
store's change token (S3 ETag, or size and mtime) that lets ``sdagent cache index`` skip unchanged
files. The sha256 is the only thing trusted: nothing whose bytes do not hash to it is served.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdagent.cache.errors import CacheError, ModelNotFound
from sdagent.modelnames import candidates

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

Kind = Literal["checkpoint", "lora", "vae", "embedding"]
KINDS: tuple[str, ...] = ("checkpoint", "lora", "vae", "embedding")

# Where each kind lands under the cache directory: ComfyUI's folder names (A1111 takes them with
# --ckpt-dir, --lora-dir, --vae-dir, --embeddings-dir; ComfyUI with extra_model_paths.yaml).
KIND_DIRS: dict[str, str] = {"checkpoint": "checkpoints", "lora": "loras", "vae": "vae", "embedding": "embeddings"}

# A store's top folder names that tell the kind, in both WebUIs' conventions (lower-cased).
FOLDER_KINDS: dict[str, str] = {
    "checkpoints": "checkpoint", "stable-diffusion": "checkpoint", "ckpt": "checkpoint",
    "loras": "lora", "lora": "lora", "vae": "vae", "embeddings": "embedding", "embedding": "embedding",
}  # fmt: skip

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_HEX = frozenset("0123456789abcdef")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model's relative path, or None: it becomes a path on local disk."""
    if not name or len(name.encode()) > 1024:
        return "empty or longer than 1024 bytes"
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return "absolute, or has a backslash or NUL"
    for segment in name.split("/"):
        if segment in ("", ".", "..") or len(segment.encode()) > 255:
            return f"bad path segment {segment!r}"
        if segment.startswith(".") and segment.endswith(".partial"):
            return "looks like a partial download"
    return None


class ModelEntry(BaseModel):
    """One model of the store."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # newer manifests may carry more

    name: str
    size: int = Field(ge=0)
    sha256: str
    kind: Kind = "checkpoint"
    path: str | None = None
    version: str | None = None

    @field_validator("name", "path")
    @classmethod
    def _relative_path(cls, value: str | None) -> str | None:
        if value is not None and (problem := name_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower()
        if len(value) != 64 or not set(value) <= _HEX:
            raise ValueError("not a sha256 hex digest")
        return value

    @property
    def source_path(self) -> str:
        """Where the file lives under the store's root."""
        return self.path or self.name

    @property
    def local_path(self) -> str:
        """Where the file lives under the cache directory: ``<kind folder>/<name>``."""
        return f"{KIND_DIRS[self.kind]}/{self.name}"

    def same_content(self, other: ModelEntry) -> bool:
        return (self.sha256, self.size) == (other.sha256, other.size)


@dataclass(frozen=True)
class ManifestDiff:
    """What changed between two manifests, by name."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class Manifest:
    """Models by name; names are unique across kinds (a job names its model by name alone)."""

    def __init__(self, entries: Iterable[ModelEntry] = ()) -> None:
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise CacheError(f"manifest: model {entry.name!r} is listed twice")
            self._entries[entry.name] = entry

    @classmethod
    def loads(cls, data: bytes | str) -> Manifest:
        """Parse ``manifest.json``; raises CacheError naming the first bad field."""
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise CacheError(f"manifest: not JSON: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("models"), list):
            raise CacheError('manifest: expected {"version": 1, "models": [...]}')
        if document.get("version", MANIFEST_VERSION) > MANIFEST_VERSION:
            raise CacheError(f"manifest: version {document['version']} is newer than this agent reads")
        entries = []
        for index, item in enumerate(document["models"]):
            try:
                entries.append(ModelEntry.model_validate(item))
            except ValidationError as exc:
                error = exc.errors(include_url=False)[0]
                where = ".".join(str(part) for part in ("models", index, *error["loc"]))
                raise CacheError(f"manifest: {where}: {error['msg']} (got {error.get('input')!r})") from None
        return cls(entries)

    def dumps(self) -> str:
        models = [entry.model_dump(exclude_none=True) for entry in sorted(self, key=lambda e: e.name)]
        return json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=1) + "\n"

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str) -> ModelEntry:
        """The entry named ``name``, or the one model whose name without its suffix is ``name``
        (jobs often say ``sd_xl_base_1.0`` for ``sd_xl_base_1.0.safetensors``)."""
        matches = candidates(name, self._entries)
        if len(matches) == 1:
            return self._entries[matches[0]]
        if matches:
            raise ModelNotFound(f"model {name!r} is ambiguous: {sorted(matches)}")
        raise ModelNotFound(f"model {name!r} is not in the store's manifest")

    def diff(self, newer: Manifest) -> ManifestDiff:
        old, new = set(self._entries), set(newer._entries)
        changed = [n for n in old & new if not self._entries[n].same_content(newer._entries[n])
                   or self._entries[n].kind != newer._entries[n].kind]  # fmt: skip
        return ManifestDiff(tuple(sorted(new - old)), tuple(sorted(changed)), tuple(sorted(old - new)))


def kind_and_name(relative_path: str) -> tuple[str, str]:
    """The kind and model name of a file at ``relative_path`` in a store: a top folder named for a
    kind (``Lora/x.safetensors``, ``checkpoints/y.ckpt``) gives the kind and is left out of the
    name; anything else is a checkpoint named by its whole path."""
    top, _, rest = relative_path.partition("/")
    kind = FOLDER_KINDS.get(top.lower())
    if kind is not None and rest:
        return kind, rest
    return "checkpoint", relative_path


def is_model_file(relative_path: str) -> bool:
    base = posixpath.basename(relative_path)
    return base.lower().endswith(MODEL_SUFFIXES) and not base.startswith(".")
