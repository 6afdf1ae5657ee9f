"""The checkpoints the simulated WebUI can load: declared names plus files staged in a models dir.

Hashes are derived from the name, not the file (a staged file may be an empty placeholder): the
short hash is :func:`sdagent.backends.simulated.model_hash`, so both simulators report the same
``sd_model_hash`` for a model.

Two behaviours of the real WebUIs are kept because an agent must cope with them:

* A1111 hashes a newly found file in full on its first load (unless ``--no-hashing``), so until
  then its ``sd-models`` entry has ``hash: null`` and a title without ``[shorthash]``; declared
  models count as already hashed (A1111 keeps hashes in ``cache.json``). With ``hashing=False``
  (``--no-hashing``, as the shipped launcher runs it) no model ever has a hash.
* A1111 rescans only on ``refresh-checkpoints``; ComfyUI re-reads a folder whenever its mtime
  changes, so an atomic rename into the folder shows up at once (:meth:`Catalog.refresh_if_changed`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdagent.backends.simulated import model_hash

# What both WebUIs list as checkpoints (A1111 takes .ckpt and .safetensors; ComfyUI takes more,
# but these two are what a model cache stages).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Checkpoint:
    """One loadable model. ``name`` is its path relative to the models dir, as both APIs show it."""

    name: str
    size_mb: int
    filename: str  # the absolute path A1111 reports; a made-up one for a declared model
    hashed: bool = True  # False until A1111 has loaded (and so hashed) a newly staged file

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.name.encode()).hexdigest() if self.hashed else None

    @property
    def shorthash(self) -> str | None:
        return model_hash(self.name) if self.hashed else None

    @property
    def legacy_hash(self) -> str:
        # A1111's old 8-digit hash, read from the file's bytes; only ever used as an alias.
        return hashlib.sha256(f"legacy/{self.name}".encode()).hexdigest()[:8]

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def name_for_extra(self) -> str:
        return os.path.splitext(os.path.basename(self.name))[0]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.hashed else self.name

    def aliases(self) -> list[str]:
        """Every string A1111 accepts for this model in ``sd_model_checkpoint``."""
        ids = [self.legacy_hash, self.model_name, self.title, self.name, self.name_for_extra]
        ids.append(f"{self.name} [{self.legacy_hash}]")
        if self.hashed:
            ids += [
                str(self.shorthash),
                str(self.sha256),
                f"{self.name} [{self.shorthash}]",
                f"{self.name_for_extra} [{self.shorthash}]",
            ]
        return ids


@dataclass
class Catalog:
    """Declared models (name -> VRAM size in MB) plus whatever ``models_dir`` holds."""

    declared: Mapping[str, int]
    models_dir: Path | None = None
    default_size_mb: int = 2048
    hashing: bool = True  # False: A1111's --no-hashing, no model ever gets a hash (the image's setting)
    _scanned: dict[str, Checkpoint] = field(default_factory=dict, init=False)
    _declared: dict[str, Checkpoint] = field(default_factory=dict, init=False)
    _dir_mtime: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        base = self.models_dir or Path("/simulated/models/Stable-diffusion")
        self._declared = {name: Checkpoint(name, size, str(base / name), hashed=self.hashing)
                          for name, size in self.declared.items()}  # fmt: skip
        self.refresh()

    def _models_dir(self) -> Path:
        if self.models_dir is None:  # _scan finds nothing without one
            raise ValueError("the catalog has no models directory")
        return self.models_dir

    def refresh(self) -> None:
        """Rescan the models dir, as A1111's ``refresh-checkpoints`` does."""
        self._dir_mtime = self._mtime()
        found = {}
        for name in self._scan():
            if name in self._declared:
                continue
            known = self._scanned.get(name)
            found[name] = known or Checkpoint(
                name,
                self.default_size_mb,
                str(self._models_dir() / name),
                hashed=False,
            )
        self._scanned = found

    def refresh_if_changed(self) -> None:
        """Rescan when the models dir's mtime moved, as ComfyUI's folder cache does."""
        if self.models_dir is not None and self._mtime() != self._dir_mtime:
            self.refresh()

    def all(self) -> list[Checkpoint]:
        merged = {**self._scanned, **self._declared}
        return [merged[name] for name in sorted(merged, key=str.lower)]

    def names(self) -> list[str]:
        return [checkpoint.name for checkpoint in self.all()]

    def get(self, name: str) -> Checkpoint | None:
        """The model called exactly ``name`` (ComfyUI's ``ckpt_name``)."""
        return self._declared.get(name) or self._scanned.get(name)

    def resolve(self, alias: str | None) -> Checkpoint | None:
        """The model any A1111 alias names: title, name, hash, sha256, ..."""
        if not alias:
            return None
        for checkpoint in self.all():
            if alias in checkpoint.aliases():
                return checkpoint
        return None

    def _scan(self) -> Iterable[str]:
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        names = []
        for path in self.models_dir.rglob("*"):
            if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file() and not path.name.startswith("."):
                names.append(path.relative_to(self.models_dir).as_posix())
        return names

    def _mtime(self) -> float | None:
        if self.models_dir is None:
            return None
        try:
            return self.models_dir.stat().st_mtime
        except OSError:
            return None
