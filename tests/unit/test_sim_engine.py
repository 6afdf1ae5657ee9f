"""The simulated GPU: step timing, interrupt and skip, model load costs, VRAM, generation faults."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdagent.sim.catalog import Catalog
from sdagent.sim.engine import CRASH_EXIT_CODE, Engine, Outcome, SimulatedOOM
from sdagent.sim.faults import Api, Fault, FaultKind


def engine(**kwargs: object) -> Engine:
    catalog = Catalog({"a.safetensors": 2000, "b.safetensors": 2000, "huge.safetensors": 50_000})
    return Engine(catalog, **kwargs)  # type: ignore[arg-type]


def test_steps_report_progress_and_complete() -> None:
    sim = engine(step_latency_s=0.001)
    seen: list[tuple[int, int]] = []

    async def scenario() -> Outcome:
        async def on_step(step: int, steps: int) -> None:
            seen.append((step, steps))

        generation = sim.begin(Api.A1111)
        return await sim.run_steps(generation, 3, on_step)

    assert asyncio.run(scenario()) is Outcome.COMPLETED
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_interrupt_stops_between_steps_and_only_hits_its_own_api() -> None:
    sim = engine(step_latency_s=0.01)

    async def scenario() -> tuple[Outcome, int, bool]:
        generation = sim.begin(Api.A1111)
        task = asyncio.create_task(sim.run_steps(generation, 1000))
        await asyncio.sleep(0.03)
        other_api = sim.interrupt(Api.COMFYUI)
        sim.interrupt(Api.A1111)
        return await task, generation.step, other_api

    outcome, step, other_api = asyncio.run(scenario())
    assert outcome is Outcome.INTERRUPTED and 0 < step < 1000 and other_api is False


def test_hang_fault_never_progresses_until_interrupted() -> None:
    sim = engine(step_latency_s=0.0)
    sim.faults.arm(Fault(FaultKind.HANG))

    async def scenario() -> tuple[int, Outcome]:
        generation = sim.begin(Api.A1111)
        task = asyncio.create_task(sim.run_steps(generation, 5))
        await asyncio.sleep(0.05)
        step_while_hung = generation.step
        generation.interrupt()
        return step_while_hung, await task

    assert asyncio.run(scenario()) == (0, Outcome.INTERRUPTED)


def test_crash_fault_exits_the_process_after_the_first_step() -> None:
    exits: list[int] = []
    sim = engine(exit_process=exits.append)
    sim.faults.arm(Fault(FaultKind.CRASH))

    async def scenario() -> None:
        await sim.run_steps(sim.begin(Api.COMFYUI), 3)

    asyncio.run(scenario())
    assert exits == [CRASH_EXIT_CODE]


def test_oom_fault_raises_and_counts_an_oom_event() -> None:
    sim = engine()
    sim.faults.arm(Fault(FaultKind.OOM))

    async def scenario() -> None:
        await sim.run_steps(sim.begin(Api.A1111), 3)

    with pytest.raises(SimulatedOOM, match="CUDA out of memory"):
        asyncio.run(scenario())
    assert sim.oom_events == 1


def test_cold_load_costs_load_latency_and_a_warm_switch_costs_less() -> None:
    sim = engine(load_latency_s=0.15, switch_latency_s=0.01, ram_cache_models=2)
    a, b = sim.catalog.get("a.safetensors"), sim.catalog.get("b.safetensors")

    async def timed(checkpoint: object) -> float:
        started = time.monotonic()
        await sim.ensure_loaded(checkpoint)  # type: ignore[arg-type]
        return time.monotonic() - started

    async def scenario() -> list[float]:
        return [await timed(a), await timed(b), await timed(a), await timed(a)]

    cold_a, cold_b, warm_a, already = asyncio.run(scenario())
    assert cold_a >= 0.15 and cold_b >= 0.15
    assert warm_a < 0.1 and already < 0.005
    assert sim.stats.events == {"model_loads": 2, "model_switches": 1}


def test_vram_holds_the_model_plus_working_memory_and_refuses_more() -> None:
    sim = engine(vram_total_mb=4000, vram_per_megapixel_mb=1000)

    async def scenario() -> None:
        await sim.ensure_loaded(sim.catalog.get("a.safetensors"))  # type: ignore[arg-type]

    asyncio.run(scenario())
    with sim.working_memory(1000, 1000, 1):  # 1 MP: 1000 MB on top of the 2000 MB model
        assert sim.vram_used_mb == 3000
    assert sim.vram_used_mb == 2000 and sim.peak_mb == 3000
    with pytest.raises(SimulatedOOM), sim.working_memory(1000, 1000, 3):
        pass
    assert sim.oom_events == 1


def test_a_model_larger_than_the_card_fails_to_load() -> None:
    sim = engine(vram_total_mb=24_000)

    async def scenario() -> None:
        await sim.ensure_loaded(sim.catalog.get("huge.safetensors"))  # type: ignore[arg-type]

    with pytest.raises(SimulatedOOM):
        asyncio.run(scenario())
    assert sim.loaded is None
