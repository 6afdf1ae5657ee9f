"""Model cache staging throughput: from a directory store against ``cp``, and from S3 (moto).

1. Directory store: two 1.5 GB model files are generated once into a temporary directory (their
   sha256 computed as they are written, for the manifest). Each round drops the page cache before
   each of three runs: ``cp`` of both then ``sync``; staging both as the agent's prewarm does
   (kernel copy, sha256 from the page cache, fsync, rename, two models at a time); and, as a
   floor, copy_file_range with an fsync per file and no hash. Rounds rotate which run goes first.
   ``cp`` does not make its copy durable and staging must (a model is renamed into place only once
   its bytes are on disk), so the reference is ``cp`` + ``sync``; ``cp`` alone is reported too.
2. S3: a moto server on loopback holds one object; it is staged with parallel ranged GETs (boto3's
   transfer manager, chunk 16 MiB, 16 in flight) and, for reference, fetched with a single GET
   streamed through the same hashing writer to local disk. moto is a Python server sharing this
   machine's CPUs with the client, so this ratio says little about real S3.

Usage: ``.venv/bin/python bench/cache_staging.py [--file-gb 1.5] [--files 2] [--rounds 3]
[--s3-mb 256]``. Needs about 2 x files x file-gb of free disk; run as root so the page cache can be
dropped between runs (said in the output either way). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config
from common import emit, say, setup
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sdagent.cache import ModelCache, S3Source
from sdagent.cache.manifest import Manifest, ModelEntry
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.sources.s3 import crt_available
from sdagent.cache.staging import HashingWriter
from sdagent.devstack.moto import DUMMY_CREDENTIALS, MotoServer

MiB = 1024 * 1024
GENERATE_BLOCK = 64 * MiB
S3_CHUNK = 16 * MiB
S3_CONCURRENCY = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-gb", type=float, default=1.5)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3-mb", type=int, default=256)
    args = parser.parse_args()
    setup()
    figures: dict = {"cpus": os.cpu_count(), "crt_installed": crt_available()}
    work = Path(tempfile.mkdtemp(prefix="sdagent-cache-bench-"))
    try:
        figures |= directory_bench(work, int(args.file_gb * 1e9), args.files, args.rounds)
        figures |= s3_bench(work, args.s3_mb * MiB)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        say(f"removed {work}")
    emit(figures)


# --- directory store ------------------------------------------------------------------------------


def directory_bench(work: Path, size: int, files: int, rounds: int) -> dict:
    store = work / "store"
    store.mkdir()
    started = time.perf_counter()
    entries = [generate(store / f"model-{n}.safetensors", size) for n in range(files)]
    DirectorySource(store).write_manifest(Manifest(entries))
    total = size * files
    say(f"generated {files} x {size / 1e9:.2f} GB in {store} ({time.perf_counter() - started:.1f} s)")
    dropped = drop_caches()
    say(f"page cache dropped between runs: {'yes' if dropped else 'NO (not root?): reads may come from memory'}")

    cp_s, cp_sync_s, stage_s, floor_s = [], [], [], []
    runs = {
        "cp": lambda: copy_with_cp(store, work / "cp", entries),
        "stage": lambda: stage(store, work / "cache", entries),
        "floor": lambda: copy_and_fsync_each(store, work / "floor", entries),
    }
    for round_ in range(rounds):
        order = list(runs)[round_ % 3 :] + list(runs)[: round_ % 3]  # rotate: no run always goes first
        for name in order:
            drop_caches()
            seconds = runs[name]()
            if name == "cp":
                cp_s.append(seconds[0])
                cp_sync_s.append(seconds[0] + seconds[1])
                say(
                    f"round {round_ + 1}: cp {mbps(total, seconds[0]):6.0f} MB/s, cp + sync {mbps(total, sum(seconds)):6.0f} MB/s"
                )
            elif name == "stage":
                stage_s.append(seconds)
                say(
                    f"round {round_ + 1}: staging {mbps(total, seconds):6.0f} MB/s (prewarm: sha256 verified, fsynced, renamed)"
                )
            else:
                floor_s.append(seconds)
                say(f"round {round_ + 1}: kernel copy + fsync per file, no hash {mbps(total, seconds):6.0f} MB/s")
    stage_rate = mbps(total, statistics.median(stage_s))
    cp_rate = mbps(total, statistics.median(cp_sync_s))
    cp_nosync_rate = mbps(total, statistics.median(cp_s))
    floor_rate = mbps(total, statistics.median(floor_s))
    say(f"directory: staging {stage_rate:.0f} MB/s, cp + sync {cp_rate:.0f} MB/s -> ratio {stage_rate / cp_rate:.2f} "
        f"(cp without sync {cp_nosync_rate:.0f} MB/s -> {stage_rate / cp_nosync_rate:.2f}); medians of {rounds} rounds")  # fmt: skip
    say(f"  a bare kernel copy with an fsync per file (no hash, no cache) reaches {floor_rate:.0f} MB/s "
        f"({floor_rate / cp_rate:.2f} of cp + sync): the durability each model needs before its rename")  # fmt: skip
    return {
        "file_bytes": size,
        "files": files,
        "rounds": rounds,
        "drop_caches": dropped,
        "mb_per_s": round(stage_rate, 1),
        "cp_mb_per_s": round(cp_rate, 1),
        "cp_nosync_mb_per_s": round(cp_nosync_rate, 1),
        "ratio_vs_cp": round(stage_rate / cp_rate, 3),
        "ratio_vs_cp_nosync": round(stage_rate / cp_nosync_rate, 3),
        "fsync_per_file_floor_mb_per_s": round(floor_rate, 1),
        "ratio_vs_fsync_per_file_floor": round(stage_rate / floor_rate, 3),
        "stage_s": [round(s, 2) for s in stage_s],
        "cp_sync_s": [round(s, 2) for s in cp_sync_s],
    }


def generate(path: Path, size: int) -> ModelEntry:
    """Incompressible bytes (cp cannot skip holes, no layer can dedupe), hashed as they are written.
    AES-CTR over zeros: several GB/s, where os.urandom manages a few hundred MB/s."""
    digest = hashlib.sha256()
    stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(GENERATE_BLOCK)
    with path.open("wb") as handle:
        written = 0
        while written < size:
            block = stream.update(zeros[: min(GENERATE_BLOCK, size - written)])
            digest.update(block)
            handle.write(block)
            written += len(block)
    return ModelEntry(name=path.name, size=size, sha256=digest.hexdigest())


def copy_with_cp(store: Path, target: Path, entries: list[ModelEntry]) -> tuple[float, float]:
    target.mkdir()
    try:
        started = time.perf_counter()
        subprocess.run(["cp", *(str(store / e.name) for e in entries), str(target)], check=True)
        copied = time.perf_counter()
        subprocess.run(["sync", *(str(target / e.name) for e in entries)], check=True)
        return copied - started, time.perf_counter() - copied
    finally:
        shutil.rmtree(target)


def stage(store: Path, root: Path, entries: list[ModelEntry]) -> float:
    """What the agent does at boot: prewarm the models (two at a time, the default)."""
    cache = ModelCache(root, DirectorySource(store), budget_bytes=sum(e.size for e in entries) * 2)
    try:
        cache.manifest()  # not part of the copy
        started = time.perf_counter()
        report = cache.prewarm([e.name for e in entries])
        seconds = time.perf_counter() - started
        assert not report.failed and all(r.staged for r in report.results), report
        return seconds
    finally:
        shutil.rmtree(root)


def copy_and_fsync_each(store: Path, target: Path, entries: list[ModelEntry]) -> float:
    """The floor for a durable copy per file: copy_file_range and fsync, one file after the other."""
    target.mkdir()
    try:
        started = time.perf_counter()
        for entry in entries:
            source = os.open(store / entry.name, os.O_RDONLY)
            copy = os.open(target / entry.name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                copied = 0
                while copied < entry.size:
                    copied += os.copy_file_range(source, copy, entry.size - copied)
                os.fsync(copy)
            finally:
                os.close(copy)
                os.close(source)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(target)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --- S3 -------------------------------------------------------------------------------------------


def s3_bench(work: Path, size: int) -> dict:
    with MotoServer() as moto:
        s3 = _pooled_client(moto.endpoint)
        s3.create_bucket(Bucket="models")
        data = os.urandom(size)
        s3.put_object(Bucket="models", Key="store/big.safetensors", Body=data)
        entry = ModelEntry(name="big.safetensors", size=size, sha256=hashlib.sha256(data).hexdigest())
        del data
        source = S3Source(s3, "models", "store", chunk=S3_CHUNK, concurrency=S3_CONCURRENCY)
        source.write_manifest(Manifest([entry]))
        transfer_client = source.transfer_client  # classic: the CRT client ignores moto's endpoint
        say(f"moto S3 at {moto.endpoint}: one {size / MiB:.0f} MiB object ({transfer_client} transfer client)")
        parallel, single = [], []
        for round_ in range(2):
            root = work / f"s3-cache-{round_}"
            cache = ModelCache(root, source, budget_bytes=size * 2)
            cache.manifest()
            started = time.perf_counter()
            cache.ensure(entry.name)
            parallel.append(time.perf_counter() - started)
            shutil.rmtree(root)
            single.append(single_get(s3, "models", "store/big.safetensors", work / "single.bin", entry.sha256))
            say(f"round {round_ + 1}: parallel ranges {mbps(size, parallel[-1]):6.0f} MB/s, "
                f"single GET {mbps(size, single[-1]):6.0f} MB/s")  # fmt: skip
    parallel_rate = mbps(size, statistics.median(parallel))
    single_rate = mbps(size, statistics.median(single))
    say(f"S3 (moto): parallel {parallel_rate:.0f} MB/s vs single GET {single_rate:.0f} MB/s -> ratio "
        f"{parallel_rate / single_rate:.2f} (bounded by moto's CPU on this machine, not by S3)")  # fmt: skip
    return {
        "s3_object_bytes": size,
        "s3_parallel_mb_per_s": round(parallel_rate, 1),
        "s3_single_mb_per_s": round(single_rate, 1),
        "s3_parallel_ratio": round(parallel_rate / single_rate, 3),
        "s3_concurrency": S3_CONCURRENCY,
        "s3_transfer_client": transfer_client,
        "s3_chunk_bytes": S3_CHUNK,
    }


def _pooled_client(endpoint: str):
    # A pool as large as the ranges in flight (aws_client's default of 10 would queue the rest).
    config = Config(s3={"addressing_style": "path"}, max_pool_connections=S3_CONCURRENCY + 4)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config, **DUMMY_CREDENTIALS)


def single_get(s3, bucket: str, key: str, target: Path, sha256: str) -> float:
    """One GET streamed through the cache's hashing writer to local disk, fsynced: the baseline."""
    started = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writer = HashingWriter(fd)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        while chunk := body.read(1 * MiB):
            writer.write(chunk)
        assert writer.hexdigest() == sha256
        os.fsync(fd)
    finally:
        writer.close()
        os.close(fd)
        target.unlink()
    return time.perf_counter() - started


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


if __name__ == "__main__":
    main()
