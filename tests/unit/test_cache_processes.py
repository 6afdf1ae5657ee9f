"""The model cache across real processes: one download per model per machine, a crash mid-copy,
pins held by another process, and a real full disk (a 1 MiB tmpfs, when this runs as root)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sdagent.cache import CacheFull, ModelCache
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import InstrumentedSource, make_store, model_bytes

KiB = 1024
MiB = 1024 * KiB

# A process that opens the cache on a slowed-down directory store, logs each download it starts to
# a shared file, and prints what ensure() (or a pin held for a while) returned.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from sdagent.cache import ModelCache
    from sdagent.cache.sources.directory import DirectorySource
    from sdagent.cache.testing import InstrumentedSource
    from sdagent.logs import configure_logging

    configure_logging("json", "warning")  # stdout carries the answer
    store, root, name, log_path, go, delay, hold = sys.argv[1:8]
    def record(fetch):
        with open(log_path, "a") as log:
            log.write(json.dumps({"pid": __import__("os").getpid(), "offset": fetch.offset}) + "\\n")
    source = InstrumentedSource(DirectorySource(Path(store), chunk=64 * 1024), delay_per_write_s=float(delay),
                                on_fetch=record)
    cache = ModelCache(Path(root), source, budget_bytes=100 * 1024 * 1024)
    while not Path(go).exists():
        time.sleep(0.005)
    if float(hold):
        with cache.use(name) as local:
            print(json.dumps({"pinned": local.name}), flush=True)
            time.sleep(float(hold))
    else:
        local = cache.ensure(name)
        print(json.dumps({"staged": local.staged, "sha256": local.sha256, "path": str(local.path)}), flush=True)
    """
)


def start_child(store: Path, root: Path, name: str, log: Path, go: Path, *, delay=0.0, hold=0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store), str(root), name, str(log), str(go), str(delay), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_asking_at_once_download_once(tmp_path):
    data = model_bytes("a", 1 * MiB)
    make_store(tmp_path / "store", {"a.safetensors": data})
    log, go = tmp_path / "fetches.log", tmp_path / "go"
    # 16 chunks, 0.1 s each: the download outlasts any difference in when the two start.
    children = [start_child(tmp_path / "store", tmp_path / "cache", "a.safetensors", log, go, delay=0.1)
                for _ in range(2)]  # fmt: skip
    time.sleep(1.0)  # both are importing and waiting for the go
    go.touch()

    results = [finish(child) for child in children]

    assert len(log.read_text().splitlines()) == 1  # one download on this machine
    assert sorted(r["staged"] for r in results) == [True, True]  # the other waited for it
    assert Path(results[0]["path"]).read_bytes() == data
    assert {r["sha256"] for r in results} == {ModelCache(tmp_path / "cache", DirectorySource(tmp_path / "store"),
                                                         budget_bytes=MiB * 100).ensure("a").sha256}  # fmt: skip


def test_a_crash_mid_copy_leaves_no_visible_file_and_the_next_process_resumes(tmp_path):
    data = model_bytes("a", 2 * MiB)
    make_store(tmp_path / "store", {"a.safetensors": data})
    log, go = tmp_path / "fetches.log", tmp_path / "go"
    go.touch()
    child = start_child(tmp_path / "store", tmp_path / "cache", "a.safetensors", log, go, delay=0.02)
    staging = tmp_path / "cache" / ".sdagent" / "staging"
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size >= 256 * KiB for p in staging.glob("*.partial")) if staging.exists() else True:
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)

    child.send_signal(signal.SIGKILL)  # no cleanup of any kind
    child.wait()

    models = tmp_path / "cache" / "checkpoints"
    assert list(models.iterdir()) == []
    [partial] = staging.glob("*.partial")
    kept = partial.stat().st_size
    source = InstrumentedSource(DirectorySource(tmp_path / "store", chunk=64 * KiB))
    cache = ModelCache(tmp_path / "cache", source, budget_bytes=100 * MiB)

    local = cache.ensure("a")

    assert [f.offset for f in source.fetches] == [kept]
    assert local.path.read_bytes() == data
    assert cache.stats().resumes == 1
    assert list(staging.iterdir()) == []


def test_a_model_pinned_by_another_process_is_not_evicted(tmp_path):
    make_store(tmp_path / "store", {f"{n}.safetensors": model_bytes(n, 100 * KiB) for n in "abc"})
    cache = ModelCache(tmp_path / "cache", DirectorySource(tmp_path / "store"), budget_bytes=200 * KiB)
    cache.ensure("a")
    go = tmp_path / "go"
    go.touch()
    child = start_child(tmp_path / "store", tmp_path / "cache", "a.safetensors", tmp_path / "log", go, hold=30)
    assert json.loads(child.stdout.readline()) == {"pinned": "a.safetensors"}
    try:
        cache.ensure("b")
        cache.ensure("c")  # a is the least recently used; the other process's pin keeps it

        assert sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()) == [
            "a.safetensors",
            "c.safetensors",
        ]
        assert [e.name for e in cache.ls() if e.in_use] == ["a.safetensors"]
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str):
    """A real file system that fills up; needs root (skipped otherwise)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"sdagent-test-{uuid.uuid4().hex[:6]}",
                              str(path)], capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_really_full_disk_fails_the_staging_and_removes_the_partial(tmp_path):
    make_store(tmp_path / "store", {"big.safetensors": model_bytes("big", 3 * MiB)})
    with tiny_tmpfs(tmp_path / "small", "1m") as root:
        # The disk check before the download is told there is room: the write itself must fail.
        cache = ModelCache(root, DirectorySource(tmp_path / "store", chunk=64 * KiB), budget_bytes=100 * MiB,
                           disk_free=lambda _: 1 << 40)  # fmt: skip

        with pytest.raises(CacheFull, match="disk full"):
            cache.ensure("big")

        assert list((root / "checkpoints").iterdir()) == []
        assert list((root / ".sdagent" / "staging").iterdir()) == []
        assert cache._state.read().staging == {}
