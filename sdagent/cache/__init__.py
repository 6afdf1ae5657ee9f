"""The model cache: checkpoints, LoRAs, VAEs and embeddings from S3 or a mounted store, staged on
local NVMe for the WebUI within a byte budget. See docs/model-cache.md.

The agent builds one :class:`ModelCache` (:func:`build_model_cache`), prewarms it before taking
work, runs each job inside ``cache.use(job.model)``, and runs a :class:`ManifestWatcher` with the
other loops.
"""

from sdagent.cache.assembly import build_model_cache, build_s3_client, build_source
from sdagent.cache.cache import (
    CachedEntry,
    CacheStats,
    LocalModel,
    ModelCache,
    PrewarmReport,
    PrewarmResult,
    VerifyResult,
)
from sdagent.cache.config import CacheConfig
from sdagent.cache.errors import (
    CacheError,
    CacheFull,
    ManifestMissing,
    ModelCorrupt,
    ModelInUse,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
)
from sdagent.cache.manifest import Manifest, ManifestDiff, ModelEntry
from sdagent.cache.sources import DirectorySource, ModelSource, S3Source
from sdagent.cache.watch import ManifestWatcher, ModelsChanged

__all__ = [
    "CacheConfig",
    "CacheError",
    "CacheFull",
    "CacheStats",
    "CachedEntry",
    "DirectorySource",
    "LocalModel",
    "Manifest",
    "ManifestDiff",
    "ManifestMissing",
    "ManifestWatcher",
    "ModelCache",
    "ModelCorrupt",
    "ModelEntry",
    "ModelInUse",
    "ModelNotFound",
    "ModelSource",
    "ModelTooLarge",
    "ModelUnavailable",
    "ModelsChanged",
    "PrewarmReport",
    "PrewarmResult",
    "S3Source",
    "VerifyResult",
    "build_model_cache",
    "build_s3_client",
    "build_source",
]
