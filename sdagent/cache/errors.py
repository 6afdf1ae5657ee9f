"""The model cache's errors, until they move into :mod:`sdagent.errors`.

They derive from the backend's bases because a job meets them where it meets the backend: while
getting its model ready. Transient ones (``BackendUnavailable``) are retried by the job loop with
backoff; the others fail the job.
"""

from __future__ import annotations

from sdagent.errors import BackendError, BackendUnavailable, ModelNotFound

__all__ = ["CacheError", "CacheFull", "ManifestMissing", "ModelCorrupt", "ModelInUse", "ModelNotFound",
           "ModelTooLarge", "ModelUnavailable"]  # fmt: skip


class CacheError(BackendError):
    """Raised when the model cache fails for good: the store refused access, a bad name, a bad manifest."""

    reason = "model_cache_error"


class ModelUnavailable(BackendUnavailable):
    """Raised when the model store cannot be reached or fails transiently (network, 5xx, a mount that
    went away); the partial download is kept and the next attempt resumes it."""

    reason = "model_unavailable"


class CacheFull(BackendUnavailable):
    """Raised when the local disk has no room for a model: the budget is taken by models in use or
    being staged, or the disk itself is full (ENOSPC). Transient: pins are released as jobs end.
    The partial file is removed."""

    reason = "model_cache_full"


class ModelTooLarge(CacheError):
    """Raised when a model is larger than the whole cache budget: no eviction can make room."""

    reason = "model_too_large"


class ModelCorrupt(CacheError):
    """Raised when a staged model's sha256 or size differs from the manifest; the file is removed and
    never served."""

    reason = "model_corrupt"


class ManifestMissing(CacheError):
    """Raised when the store has no ``manifest.json`` (build one with ``sdagent cache index``)."""

    reason = "model_manifest_missing"


class ModelInUse(CacheError):
    """Raised when an explicit eviction names a model that a job is using or a stager is writing."""

    reason = "model_in_use"
