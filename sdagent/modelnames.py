"""How a job's model name meets the names a store, a cache or a WebUI lists.

One rule everywhere names are compared (the store's manifest, the local cache, each backend's
checkpoint list, the supervisor's readiness check): a listed name is meant when it is the job's
name, or when it is the job's name plus an extension. Jobs often say ``sd_xl_base_1.0`` for
``sd_xl_base_1.0.safetensors``; A1111 and ComfyUI list the latter.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable


def candidates(model: str, names: Iterable[str]) -> list[str]:
    """The listed names ``model`` may mean: itself when listed, else each ``model`` + extension."""
    listed = list(names)
    if model in listed:
        return [model]
    return [name for name in listed if posixpath.splitext(name)[0] == model]


def match_model(model: str, names: Iterable[str]) -> str | None:
    """The one listed name ``model`` means; None when none or several do."""
    found = candidates(model, names)
    return found[0] if len(found) == 1 else None


def is_listed(model: str, names: Iterable[str]) -> bool:
    return match_model(model, names) is not None
