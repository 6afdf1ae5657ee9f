"""The one interface between the job loop and whatever generates images.

The loop never knows which framework runs: it calls :meth:`Backend.generate` with a validated
:class:`~sdagent.jobs.Job` and gets :class:`Artifact` bytes back. Adding a framework is adding one
module in this package that implements :class:`Backend`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdagent.jobs import Job


@dataclass(frozen=True)
class Artifact:
    """One generated file: an image or a video, with what the backend knows of it."""

    data: bytes
    content_type: str  # e.g. image/png, video/mp4
    extension: str  # without the dot: png, jpeg, webp, mp4, webm, gif
    seed: int | None = None


@dataclass
class Generation:
    """What a finished generation returns: the files, the backend's ``info`` and its timings."""

    artifacts: list[Artifact]
    info: dict[str, Any] = field(default_factory=dict)  # actual seed, model hash... echoed in the result
    inference_ms: float = 0.0


@dataclass(frozen=True)
class Health:
    """The backend's answer to a health probe."""

    ready: bool
    detail: str = ""
    models: tuple[str, ...] = ()
    loaded_model: str | None = None


ProgressCallback = Callable[[int, int], None]
"""Called with (step, steps) while a job runs; cheap and thread-safe on the caller's side."""


class Backend(abc.ABC):
    """A generation framework driven through one job schema.

    Calls come from the agent's single job thread, one job at a time, except :meth:`interrupt`,
    which may come from any thread while :meth:`generate` runs.
    """

    name: str = "backend"

    @abc.abstractmethod
    def health(self) -> Health:
        """Probe the backend; never raises for a backend that is down, returns ``ready=False``."""

    @abc.abstractmethod
    def loaded_model(self) -> str | None:
        """The model now loaded, or ``None`` when none is or it is unknown."""

    @abc.abstractmethod
    def switch_model(self, model: str) -> None:
        """Load ``model``; blocks until loaded. Raises ModelNotFound or BackendUnavailable."""

    @abc.abstractmethod
    def generate(self, job: Job, progress: ProgressCallback, abort: threading.Event) -> Generation:
        """Run ``job`` on the loaded model and return its artifacts.

        Raises UnsupportedJob for what this backend cannot do, BackendUnavailable for transient
        failures (the loop retries), BackendError for permanent ones, and JobAborted when ``abort``
        was set (the loop also calls :meth:`interrupt` so a blocking call returns early).
        """

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Stop the running generation as soon as the framework allows; a no-op when idle."""

    def canonical_model(self, model: str) -> str:
        """The backend's own name for the model a job names (``tiny`` for ``tiny.safetensors``).

        What :meth:`loaded_model` answers is compared with this, never with the job's spelling.
        The default: the name as given, for backends that list models by the job's names.
        """
        return model

    def refresh_models(self) -> tuple[str, ...]:
        """Rescan the model folders (the model cache staged a file) and return the model names.

        The default re-reads the health probe's list, for frameworks that rescan by themselves.
        """
        return self.health().models

    def close(self) -> None:  # noqa: B027 - optional: most implementations hold nothing to release
        """Release connections and threads; the default has nothing to release."""
