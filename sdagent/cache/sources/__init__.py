"""Where models come from: one interface (:mod:`.base`), one module per kind of store."""

from sdagent.cache.sources.base import ModelSource, StoreFile
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.sources.offline import OfflineSource
from sdagent.cache.sources.s3 import S3Source

__all__ = ["DirectorySource", "ModelSource", "OfflineSource", "S3Source", "StoreFile"]
