"""The one NVML seam: the ``pynvml`` module (nvidia-ml-py) or a fake with the same shape
(:mod:`sdagent.gpu.fake`), and what its error codes mean. The WebUI supervisor's memory probe and
the metrics' GPU sampler both load NVML and class its errors here. NVML counts
nvmlInit/nvmlShutdown pairs, so the two users do not disturb each other.
"""

from __future__ import annotations

from types import ModuleType

# pynvml's NVML_ERROR_* values (nvml.h): stable ABI numbers.
UNINITIALIZED = 1
NOT_SUPPORTED = 3
NO_PERMISSION = 4
NOT_FOUND = 6
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
ARGUMENT_VERSION_MISMATCH = 25
GPU_NOT_FOUND = 28

# No library or driver: a CPU-only box (inf2, a laptop).
NO_GPU_ERRORS = frozenset({LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, NO_PERMISSION})
# This GPU cannot give this signal, ever.
UNSUPPORTED_ERRORS = frozenset({NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION})
# The GPU is gone until the instance is replaced.
LOST_ERRORS = frozenset({GPU_IS_LOST, RESET_REQUIRED})
# Errors that hold for good on this host: stop asking. Any other (GPU lost, timeout) may pass.
PERMANENT_ERRORS = frozenset({NOT_SUPPORTED, NOT_FOUND, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND,
                              FUNCTION_NOT_FOUND, GPU_NOT_FOUND})  # fmt: skip


def load() -> ModuleType | None:
    """The real ``pynvml``, or None where nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def error_code(exc: BaseException) -> int | None:
    """The NVML_ERROR_* value of a ``pynvml.NVMLError``; None for anything else."""
    return getattr(exc, "value", None)
