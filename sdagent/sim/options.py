"""What the simulator is configured with: one validated value object, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdagent.sim.faults import Fault

DEFAULT_MODELS = ("sd15.safetensors", "sdxl_base.safetensors")

# Defaults shaped like the reference numbers (docs: shared/reference/webui.md): SD1.5 loads from
# disk in ~5 s and from RAM in 0.3-2.5 s; a 24 GB card (A10G, L4). Scaled down so the demo stays
# brisk; tests pass zeros.
DEFAULT_STEP_LATENCY_S = 0.05
DEFAULT_LOAD_LATENCY_S = 2.0
DEFAULT_SWITCH_LATENCY_S = 0.5
DEFAULT_VRAM_TOTAL_MB = 24576
DEFAULT_MODEL_VRAM_MB = 2048  # an fp16 SD1.5 checkpoint
# Working memory of sampling per megapixel of the batch (width * height * batch_size): a 512x512
# image needs ~270 MB, a batch of 8 at 1024x1024 ~8.6 GB, so large batches run out on purpose.
DEFAULT_VRAM_PER_MEGAPIXEL_MB = 1024
# Real ComfyUI 0.3.64 on CPU wrote the history entry 0.01-0.9 s after execution_success.
DEFAULT_HISTORY_DELAY_S = 0.05
DEFAULT_RAM_CACHE_MODELS = 2  # models the OS page cache keeps warm: reloading them costs switch_latency_s


@dataclass(frozen=True)
class SimOptions:
    """Everything ``sdagent sim`` takes; invalid values raise ValueError naming the option."""

    models: tuple[str, ...] = DEFAULT_MODELS
    model_sizes_mb: dict[str, int] = field(default_factory=dict)  # per-model VRAM; default model_vram_mb
    models_dir: Path | None = None
    data_dir: Path | None = None  # ComfyUI's input/ output/ temp/; a fresh temporary dir when None
    initial_model: str | None = ""  # loaded at start like A1111 does; "" = the first model, None = none
    step_latency_s: float = DEFAULT_STEP_LATENCY_S
    load_latency_s: float = DEFAULT_LOAD_LATENCY_S
    switch_latency_s: float = DEFAULT_SWITCH_LATENCY_S
    vram_total_mb: int = DEFAULT_VRAM_TOTAL_MB
    model_vram_mb: int = DEFAULT_MODEL_VRAM_MB
    vram_per_megapixel_mb: int = DEFAULT_VRAM_PER_MEGAPIXEL_MB
    ram_cache_models: int = DEFAULT_RAM_CACHE_MODELS
    faults: tuple[Fault, ...] = ()
    seed: int | None = None  # seeds the generator behind ``seed: -1``; None: unpredictable
    hashing: bool = True  # False: as A1111's --no-hashing (checkpoints never get a hash)
    history_delay_s: float = DEFAULT_HISTORY_DELAY_S  # ComfyUI: execution_success to the history entry
    previews: bool = False  # ComfyUI: binary preview frames, as with --preview-method auto

    def __post_init__(self) -> None:
        for name in ("step_latency_s", "load_latency_s", "switch_latency_s", "history_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vram_total_mb", "model_vram_mb", "vram_per_megapixel_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ram_cache_models < 0:
            raise ValueError(f"ram_cache_models must be >= 0, got {self.ram_cache_models}")
        if not self.models and self.models_dir is None:
            raise ValueError("models: give at least one model name or a models_dir")
        unknown = set(self.model_sizes_mb) - set(self.models)
        if unknown:
            raise ValueError(f"model_sizes_mb: {sorted(unknown)} are not in models")
        if self.initial_model and self.initial_model not in self.models:
            raise ValueError(f"initial_model {self.initial_model!r} is not one of {list(self.models)}")

    @property
    def declared_models(self) -> dict[str, int]:
        return {name: self.model_sizes_mb.get(name, self.model_vram_mb) for name in self.models}


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME=SIZE_MB``, as ``--models`` takes them."""
    name, sep, size = spec.partition("=")
    if not name:
        raise ValueError(f"model spec {spec!r} has no name")
    if not sep:
        return name, None
    try:
        size_mb = int(size)
    except ValueError:
        raise ValueError(f"model spec {spec!r}: size {size!r} is not a whole number of MB") from None
    if size_mb <= 0:
        raise ValueError(f"model spec {spec!r}: size must be > 0")
    return name, size_mb
