"""The simulated GPU both APIs share: loaded model, VRAM, one generation at a time, step timing.

Everything runs on the server's event loop, so progress and interrupt requests are answered while a
generation "samples": each step is an interruptible wait of ``step_latency_s``. The engine knows
nothing about HTTP; the A1111 and ComfyUI modules translate its outcomes into their own shapes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import structlog

from sdagent.errors import SdagentError
from sdagent.sim.catalog import Catalog, Checkpoint
from sdagent.sim.faults import Api, Fault, FaultKind, FaultPlan
from sdagent.sim.options import SimOptions
from sdagent.sim.stats import Stats

log = structlog.get_logger(__name__, simulator=True)

# Distinct from Python's 1 and argparse's 2, so a supervisor test can tell the injected crash from
# a start-up error.
CRASH_EXIT_CODE = 99

Clock = Callable[[], float]
ExitProcess = Callable[[int], object]
OnStep = Callable[[int, int], Awaitable[None]]


class Outcome(enum.Enum):
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"  # A1111 /interrupt, ComfyUI /interrupt
    SKIPPED = "skipped"  # A1111 /skip: the current batch ends, the next one runs


class SimulatedOOM(SdagentError):
    """Raised when a model or a generation needs more VRAM than is free; torch's OutOfMemoryError."""

    def __init__(self, requested_mb: float, free_mb: float, total_mb: float) -> None:
        super().__init__(
            f"CUDA out of memory. Tried to allocate {requested_mb / 1024:.2f} GiB. GPU 0 has a total "
            f"capacity of {total_mb / 1024:.2f} GiB of which {max(free_mb, 0) / 1024:.2f} GiB is free. "
            "(simulated)"
        )


@dataclass(eq=False)
class Generation:
    """One running generation: its progress, its injected fault, and the flags interrupt/skip set."""

    api: Api
    fault: Fault | None
    started: float
    step: int = 0
    steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def interrupt(self) -> None:
        self.interrupted = True
        self._wake.set()

    def skip(self) -> None:
        self.skipped = True
        self._wake.set()

    def clear_skip(self) -> None:
        """A1111 resets ``skipped`` when the next batch starts."""
        self.skipped = False
        if not self.interrupted:
            self._wake.clear()

    async def wait(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: forever), returning early on an interrupt or a skip."""
        if self.interrupted or self.skipped:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def fault_of(self, kind: FaultKind) -> bool:
        return self.fault is not None and self.fault.kind is kind


class Engine:
    """Shared simulated GPU state; seams (clock, rng, exit_process) are constructor arguments."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        faults: FaultPlan | None = None,
        stats: Stats | None = None,
        step_latency_s: float = 0.0,
        load_latency_s: float = 0.0,
        switch_latency_s: float = 0.0,
        vram_total_mb: int = 24576,
        vram_per_megapixel_mb: int = 1024,
        ram_cache_models: int = 2,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        exit_process: ExitProcess = os._exit,
    ) -> None:
        self.catalog = catalog
        self.faults = faults or FaultPlan()
        self.stats = stats or Stats()
        self.step_latency_s = step_latency_s
        self.load_latency_s = load_latency_s
        self.switch_latency_s = switch_latency_s
        self.vram_total_mb = vram_total_mb
        self.vram_per_megapixel_mb = vram_per_megapixel_mb
        self.ram_cache_models = ram_cache_models
        self.clock = clock
        self.rng = rng or random.Random()
        self._exit_process = exit_process
        self.loaded: Checkpoint | None = None
        self.loading: Checkpoint | None = None
        self._warm: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = asyncio.Lock()
        self.current: Generation | None = None
        self.working_mb = 0.0
        self.peak_mb = 0.0
        self.oom_events = 0

    @classmethod
    def from_options(
        cls,
        options: SimOptions,
        *,
        clock: Clock = time.monotonic,
        exit_process: ExitProcess = os._exit,
    ) -> Engine:
        catalog = Catalog(options.declared_models, options.models_dir, options.model_vram_mb, options.hashing)
        faults = FaultPlan()
        for fault in options.faults:
            faults.arm(fault)
        return cls(
            catalog,
            faults=faults,
            step_latency_s=options.step_latency_s,
            load_latency_s=options.load_latency_s,
            switch_latency_s=options.switch_latency_s,
            vram_total_mb=options.vram_total_mb,
            vram_per_megapixel_mb=options.vram_per_megapixel_mb,
            ram_cache_models=options.ram_cache_models,
            clock=clock,
            rng=random.Random(options.seed),
            exit_process=exit_process,
        )

    # --- one at a time ---

    def exclusive(self) -> asyncio.Lock:
        """The lock every generation and model change holds: A1111's queue_lock, ComfyUI's worker."""
        return self._lock

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # --- models and VRAM ---

    async def ensure_loaded(self, checkpoint: Checkpoint) -> None:
        """Make ``checkpoint`` the loaded model, paying the load or switch cost; hold the lock."""
        if self.loaded is checkpoint:
            return
        warm = checkpoint.name in self._warm
        previous, self.loaded = self.loaded, None  # the old weights leave VRAM first
        if checkpoint.size_mb > self.vram_total_mb - self.working_mb:
            self.oom_events += 1
            self.stats.count("oom")
            raise SimulatedOOM(checkpoint.size_mb, self.vram_total_mb - self.working_mb, self.vram_total_mb)
        started = self.clock()
        self.loading = checkpoint
        try:
            await asyncio.sleep(self.switch_latency_s if warm else self.load_latency_s)
        finally:
            self.loading = None
        self.loaded = checkpoint
        self._warm[checkpoint.name] = None
        self._warm.move_to_end(checkpoint.name)
        while len(self._warm) > self.ram_cache_models:
            self._warm.popitem(last=False)
        self.stats.count("model_switches" if warm else "model_loads")
        log.info(
            "sim.model_loaded",
            model=checkpoint.name,
            previous=previous.name if previous else None,
            from_ram=warm,
            ms=round((self.clock() - started) * 1000, 1),
        )

    def unload(self) -> None:
        """Free the model's VRAM; its weights stay warm, so the next load is a switch."""
        if self.loaded is not None:
            log.info("sim.model_unloaded", model=self.loaded.name)
            self.stats.count("model_unloads")
        self.loaded = None

    @property
    def vram_used_mb(self) -> float:
        return (self.loaded.size_mb if self.loaded else 0) + self.working_mb

    @property
    def vram_free_mb(self) -> float:
        return self.vram_total_mb - self.vram_used_mb

    @contextlib.contextmanager
    def working_memory(self, width: int, height: int, batch_size: int) -> Iterator[float]:
        """Reserve sampling memory for a batch, or raise SimulatedOOM when it does not fit."""
        needed = self.vram_per_megapixel_mb * width * height * batch_size / 1e6
        if needed > self.vram_free_mb:
            self.oom_events += 1
            self.stats.count("oom")
            raise SimulatedOOM(needed, self.vram_free_mb, self.vram_total_mb)
        self.working_mb += needed
        self.peak_mb = max(self.peak_mb, self.vram_used_mb)
        try:
            yield needed
        finally:
            self.working_mb -= needed

    # --- generations ---

    def begin(self, api: Api) -> Generation:
        """Start a generation (the caller holds the lock); it meets the next armed generation fault."""
        fault = self.faults.take_generation(api)
        if fault is not None:
            log.info("sim.fault_injected", fault=fault.kind.value, api=api.value)
        self.current = Generation(api, fault, started=self.clock())
        self.stats.count(f"generations_{api.value}")
        return self.current

    def end(self, generation: Generation) -> None:
        if self.current is generation:
            self.current = None

    def interrupt(self, api: Api) -> bool:
        """Interrupt the running generation of ``api``; False when there is none."""
        if self.current is None or self.current.api is not api:
            return False
        self.current.interrupt()
        self.stats.count("interrupts")
        log.info("sim.interrupted", api=api.value)
        return True

    def skip(self, api: Api) -> bool:
        if self.current is None or self.current.api is not api:
            return False
        self.current.skip()
        log.info("sim.skipped", api=api.value)
        return True

    def random_seed(self) -> int:
        return self.rng.randrange(4294967294)  # the range A1111's get_fixed_seed draws from

    async def run_steps(self, generation: Generation, steps: int, on_step: OnStep | None = None) -> Outcome:
        """Sample ``steps`` steps, applying the generation's fault; checks interrupt/skip between steps."""
        generation.step, generation.steps = 0, steps
        if generation.fault_of(FaultKind.OOM):
            generation.fault = None  # once per generation, not once per batch
            self.oom_events += 1
            self.stats.count("oom")
            raise SimulatedOOM(self.vram_free_mb + 1024, self.vram_free_mb, self.vram_total_mb)
        if generation.fault_of(FaultKind.HANG):
            await generation.wait(None)  # stuck before the first step, as a wedged CUDA kernel
        for step in range(1, steps + 1):
            outcome = _stopped(generation)
            if outcome is not None:
                return outcome
            await generation.wait(self.step_latency_s)
            outcome = _stopped(generation)
            if outcome is not None:
                return outcome
            generation.step = step
            if on_step is not None:
                await on_step(step, steps)
            if generation.fault_of(FaultKind.CRASH):
                log.error("sim.crashing", api=generation.api.value, exit_code=CRASH_EXIT_CODE)
                self._exit_process(CRASH_EXIT_CODE)
                generation.fault = None  # only reached when a test passed a fake exit_process
        return Outcome.COMPLETED


def _stopped(generation: Generation) -> Outcome | None:
    if generation.interrupted:
        return Outcome.INTERRUPTED
    if generation.skipped:
        return Outcome.SKIPPED
    return None
