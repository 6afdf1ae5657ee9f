"""What metrics cost an instance: CPU of sampling and publishing, and PutMetricData calls a minute.

The real publisher thread runs against a real moto server on loopback (started here), with a fake
NVML whose calls spend CPU like driver calls (``REALISTIC_CALL_COSTS_S``, or ``--real-nvml`` on a
GPU instance) and a job loop recording a job every few seconds. Time runs faster than real time
(``ScaledClock``): the work per sample and per publish does not depend on the clock's speed, so
the publisher thread's CPU seconds over the simulated seconds is the fraction of one core the
same work takes in real time. The factors are low enough that no sample is skipped (the run
reports samples taken against samples due).

Figures (the last line of stdout is one JSON object):
- ``cpu_fraction``: publisher-thread CPU / simulated seconds at standard resolution (60 s
  publishes, 10 s samples); goal < 0.01.
- ``put_calls_per_min``: PutMetricData requests per instance per simulated minute; goal <= 1.
- ``cpu_fraction_1s``, ``put_calls_per_min_1s``: the same at 1 s resolution (10 s publishes, 1 s samples).

Not included: the QueueBacklog query (three Kafka admin requests a publish, on the one agent that
holds partition 0) - no broker is started here.

Usage: ``.venv/bin/python bench/metrics_cost.py [--gpus 1] [--minutes 20] [--minutes-1s 4] [--real-nvml]``
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from sdagent.devstack.moto import DUMMY_CREDENTIALS, MotoServer
from sdagent.gpu.fake import REALISTIC_CALL_COSTS_S, FakeNvml
from sdagent.logs import configure_logging
from sdagent.metrics.clock import ScaledClock
from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client
from sdagent.metrics.config import MetricsConfig
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.jobs import JobMetrics
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.publisher import MetricsPublisher

JOB_EVERY_S = 8.0  # simulated seconds per job on the recording side (an SD 1.5 512x512 job)
STANDARD_FACTOR = 60.0  # a 10 s sample every 167 ms, a publish every second
HIGH_RES_FACTOR = 10.0  # a 1 s sample every 100 ms, a publish every second
PUT_METRIC_DATA_USD_PER_1000 = 0.01
METRIC_USD_PER_MONTH = 0.30  # first 10,000 metrics; billed by the hour a metric receives data
MINUTES_PER_MONTH = 730 * 60


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Run:
    resolution: int
    simulated_s: float
    cpu_s: float
    cpu_s_psutil: float | None
    put_calls: int
    datums: int
    distinct_metrics: int
    samples: int
    samples_due: int
    job_record_us: float
    job_record_p99_us: float
    first_call_cpu_ms: float

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_s / self.simulated_s

    @property
    def put_calls_per_min(self) -> float:
        return self.put_calls / (self.simulated_s / 60)


def run(endpoint: str, *, resolution: int, minutes: float, factor: float, gpus: int, real_nvml: bool) -> Run:
    config = MetricsConfig(storage_resolution=resolution)
    client = cloudwatch_client("us-east-1", endpoint, **DUMMY_CREDENTIALS)
    # The client's first request loads the service model and opens the connection: once per
    # agent process, reported apart from the steady state.
    started_cpu = time.thread_time()
    client.put_metric_data(Namespace="SDAgentBenchWarmup", MetricData=[{"MetricName": "Warmup", "Value": 1.0}])
    first_call_cpu_ms = (time.thread_time() - started_cpu) * 1000
    calls: list[int] = []
    client.meta.events.register("before-send.cloudwatch.PutMetricData", lambda **_: calls.append(1))
    sink = CloudWatchSink(client, f"SDAgentBench{resolution}", resolution)
    sent: list[Any] = []
    original_send = sink.send

    def counting_send(data):
        sent.extend((d.name, d.dimensions) for d in data)
        return original_send(data)

    sink.send = counting_send
    nvml = None if real_nvml else FakeNvml(gpus, call_costs_s=REALISTIC_CALL_COSTS_S)
    sampler = GpuSampler(nvml)
    samples = [0]
    original_sample = sampler.sample

    def counting_sample():
        samples[0] += 1
        return original_sample()

    sampler.sample = counting_sample
    clock = ScaledClock(factor)
    identity = InstanceIdentity("i-0123456789abcdef0", "g5.xlarge", "sdagent-bench")
    publisher = MetricsPublisher(
        sink,
        identity,
        jobs=JobMetrics(jobs_topic="sdagent.jobs"),
        gpus=sampler,
        publish_interval_s=config.publish_interval_s,
        sample_interval_s=config.sample_interval_s,
        clock=clock,
    )
    stop = threading.Event()
    record_s: list[float] = []

    def job_loop() -> None:
        jobs = publisher.jobs
        timings = {
            "queue_wait_ms": 40.0,
            "switch_ms": 0.0,
            "inference_ms": 7400.0,
            "upload_ms": 120.0,
            "total_ms": 7600.0,
        }
        index = 0
        while not clock.wait(stop, JOB_EVERY_S):
            started = time.perf_counter()
            jobs.job_started()
            jobs.set_in_flight(1)
            jobs.model_cache(index % 10 != 0)
            jobs.job_finished("succeeded" if index % 20 else "failed", None if index % 20 else "backend_error", timings)
            jobs.set_in_flight(0)
            record_s.append(time.perf_counter() - started)
            index += 1

    started_sim = clock.monotonic()
    publisher.start()
    recorder = threading.Thread(target=job_loop, daemon=True)
    recorder.start()
    time.sleep(minutes * 60 / factor)
    # The steady state: what ran until now. The stop's final publish of a partial interval is a
    # once-per-life cost and stays out of the rates.
    simulated_s = clock.monotonic() - started_sim
    cpu_s = publisher.stats().cpu_s
    cpu_psutil = _thread_cpu_s(publisher)
    put_calls = len(calls)
    stop.set()
    recorder.join()
    publisher.stop()
    record_s.sort()
    return Run(
        resolution=resolution,
        simulated_s=simulated_s,
        cpu_s=cpu_s,
        cpu_s_psutil=cpu_psutil,
        put_calls=put_calls,
        datums=len(sent),
        distinct_metrics=len(set(sent)),
        samples=samples[0],
        samples_due=int(simulated_s // config.sample_interval_s),
        job_record_us=(sum(record_s) / len(record_s) * 1e6) if record_s else 0.0,
        job_record_p99_us=record_s[int(len(record_s) * 0.99)] * 1e6 if record_s else 0.0,
        first_call_cpu_ms=first_call_cpu_ms,
    )


def _thread_cpu_s(publisher: MetricsPublisher) -> float | None:
    """The publisher thread's user + system time as the kernel counts it (a cross-check)."""
    thread = publisher._thread
    if thread is None or thread.native_id is None:
        return None
    for entry in psutil.Process(os.getpid()).threads():
        if entry.id == thread.native_id:
            return entry.user_time + entry.system_time
    return None


def report(label: str, result: Run) -> None:
    minutes = result.simulated_s / 60
    say(f"{label}: {minutes:.1f} simulated minutes, {result.samples}/{result.samples_due} GPU samples taken")
    cross = f" (psutil {result.cpu_s_psutil:.3f} s)" if result.cpu_s_psutil is not None else ""
    say(f"  publisher thread CPU {result.cpu_s:.3f} s{cross} = {result.cpu_fraction:.5f} of one core")
    say(
        f"  PutMetricData {result.put_calls} calls = {result.put_calls_per_min:.2f} a minute, "
        f"{result.datums / minutes:.0f} data points a minute, {result.distinct_metrics} distinct metrics"
    )
    request_usd = result.put_calls_per_min * MINUTES_PER_MONTH * PUT_METRIC_DATA_USD_PER_1000 / 1000
    metric_usd = result.distinct_metrics * METRIC_USD_PER_MONTH
    say(f"  per instance-month: requests ${request_usd:.2f}, metrics ${metric_usd:.2f} (list prices, first tier)")
    say(
        f"  job loop: {result.job_record_us:.1f} us of recording per job (p99 {result.job_record_p99_us:.0f} us; "
        f"a thread just woken runs on cold caches), the client's first request: {result.first_call_cpu_ms:.0f} ms CPU, once"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=20.0, help="simulated minutes at standard resolution")
    parser.add_argument("--minutes-1s", type=float, default=4.0, help="simulated minutes at 1 s resolution")
    parser.add_argument("--real-nvml", action="store_true", help="sample this host's GPUs through pynvml")
    args = parser.parse_args()
    configure_logging("console", "warning")
    with MotoServer() as moto:
        say(
            f"moto up at {moto.endpoint}; {args.gpus} fake GPU(s), assumed NVML call costs"
            if not args.real_nvml
            else f"moto up at {moto.endpoint}; real NVML"
        )
        standard = run(
            moto.endpoint,
            resolution=60,
            minutes=args.minutes,
            factor=STANDARD_FACTOR,
            gpus=args.gpus,
            real_nvml=args.real_nvml,
        )
        report("standard resolution (60 s publishes, 10 s samples)", standard)
        high = run(
            moto.endpoint,
            resolution=1,
            minutes=args.minutes_1s,
            factor=HIGH_RES_FACTOR,
            gpus=args.gpus,
            real_nvml=args.real_nvml,
        )
        report("high resolution (10 s publishes, 1 s samples)", high)
    figures = {
        "cpu_fraction": round(standard.cpu_fraction, 6),
        "put_calls_per_min": round(standard.put_calls_per_min, 3),
        "cpu_fraction_1s": round(high.cpu_fraction, 6),
        "put_calls_per_min_1s": round(high.put_calls_per_min, 3),
        "datums_per_min": round(standard.datums / (standard.simulated_s / 60), 1),
        "distinct_metrics": standard.distinct_metrics,
        "gpus": args.gpus,
        "nvml": "real" if args.real_nvml else "fake",
        "samples_taken_ratio": round(standard.samples / standard.samples_due, 3),
        "samples_taken_ratio_1s": round(high.samples / high.samples_due, 3),
        "job_record_us": round(standard.job_record_us, 2),
        "first_call_cpu_ms": round(standard.first_call_cpu_ms, 1),
    }
    print(json.dumps(figures, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
