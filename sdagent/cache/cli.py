"""``sdagent cache``: the operator's view of the model cache.

    sdagent cache ls                     models on local disk, most recently used first
    sdagent cache warm NAME...           stage models now (as prewarm does at boot)
    sdagent cache evict NAME             remove a model from local disk (refused while in use)
    sdagent cache verify [NAME]          hash local copies again; corrupt ones are removed
    sdagent cache index SOURCE           hash a store's models and write its manifest.json

The cache directory and store come from ``[cache]`` of the agent's configuration (``--config``,
default /etc/sdagent/sdagent.toml when it exists); ``--dir`` and ``--source`` override them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdagent.cache.assembly import build_model_cache, build_source
from sdagent.cache.cache import ModelCache
from sdagent.cache.config import CacheConfig
from sdagent.cache.indexer import DEFAULT_WORKERS, build_manifest
from sdagent.cache.manifest import ModelEntry
from sdagent.config import DEFAULT_CONFIG_PATH
from sdagent.errors import ExitCode
from sdagent.logs import configure_logging

ConfigLoader = Callable[[Path | None], CacheConfig]


def build_parser(
    subparsers,
    *,
    load_config: ConfigLoader | None = None,
    setup_logging: Callable[[str, str], None] = configure_logging,
) -> argparse.ArgumentParser:
    """Add ``cache`` and its actions to ``subparsers`` (the ``sdagent`` command's); ``handler`` is set.

    ``load_config(path)`` reads ``[cache]`` (default: from the agent's settings); tests pass a
    ``setup_logging`` that leaves the process's logging alone."""
    cache = subparsers.add_parser("cache", help="the local model cache: ls, warm, evict, verify, index")
    cache.set_defaults(handler=lambda args: _usage(cache), cache_load_config=load_config or _load_from_settings,
                       cache_setup_logging=setup_logging)  # fmt: skip
    actions = cache.add_subparsers(metavar="ACTION")

    def action(
        name: str, help_text: str, run: Callable[[argparse.Namespace, CacheConfig], int]
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("--config", type=Path, help=f"TOML config (default {DEFAULT_CONFIG_PATH} if it exists)")
        parser.add_argument("--dir", type=Path, help="the cache directory (overrides cache.dir)")
        parser.add_argument("--source", help="s3://bucket/prefix or a directory (overrides cache.source)")
        parser.add_argument("-v", "--verbose", action="store_true", help="log events at info level")
        parser.set_defaults(handler=lambda args: _run(args, run))
        return parser

    ls = action("ls", "models on local disk, most recently used first", _ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per model")
    warm = action("warm", "stage models now", _warm)
    warm.add_argument("names", nargs="+", metavar="NAME")
    evict = action("evict", "remove a model from local disk", _evict)
    evict.add_argument("name", metavar="NAME")
    verify = action("verify", "hash local copies again; corrupt ones are removed", _verify)
    verify.add_argument("name", nargs="?", metavar="NAME")
    index = action("index", "hash a store's models and write its manifest.json", _index)
    index.add_argument("index_source", metavar="SOURCE", help="s3://bucket/prefix or a directory")
    index.add_argument("--output", help="write the manifest here ('-': stdout) instead of into the store")
    index.add_argument("--rehash", action="store_true", help="hash every file, even unchanged ones")
    index.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help=f"files hashed at once (default {DEFAULT_WORKERS})"
    )
    return cache


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return ExitCode.USAGE


def _load_from_settings(path: Path | None) -> CacheConfig:
    from sdagent.config import load_settings

    return load_settings(path).cache


def _run(args: argparse.Namespace, run: Callable[[argparse.Namespace, CacheConfig], int]) -> int:
    args.cache_setup_logging("console", "info" if args.verbose else "warning")
    path = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    config = args.cache_load_config(path)
    overrides = {"dir": args.dir, "source": args.source}
    config = CacheConfig.model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v}})
    return run(args, config)


def _open(config: CacheConfig) -> ModelCache:
    cache = build_model_cache(config, offline=True)
    assert cache is not None  # offline: built without a source
    return cache


def _ls(args: argparse.Namespace, config: CacheConfig) -> int:
    cache = _open(config)
    entries = cache.ls()
    if args.json:
        for entry in entries:
            print(json.dumps({"name": entry.name, "kind": entry.kind, "size": entry.size, "sha256": entry.sha256,
                              "path": str(entry.path), "last_used": entry.last_used, "uses": entry.uses,
                              "in_use": entry.in_use}))  # fmt: skip
        return ExitCode.OK
    used = sum(e.size for e in entries)
    print(f"{config.dir}: {len(entries)} models, {_size(used)} of {_size(config.budget_bytes)}")
    if entries:
        print(f"{'NAME':40} {'KIND':10} {'SIZE':>9} {'LAST USED':19} {'USES':>5}  IN USE")
    for e in entries:
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        print(f"{e.name:40} {e.kind:10} {_size(e.size):>9} {last:19} {e.uses:>5}  {'yes' if e.in_use else ''}")
    return ExitCode.OK


def _warm(args: argparse.Namespace, config: CacheConfig) -> int:
    report = _open(config).prewarm(args.names)
    for result in report.results:
        if result.error:
            print(f"FAILED  {result.name}: {result.error}")
        else:
            print(f"{'staged' if result.staged else 'cached':7} {result.name} in {result.ms / 1000:.1f} s")
    return ExitCode.FAILURE if report.failed else ExitCode.OK


def _evict(args: argparse.Namespace, config: CacheConfig) -> int:
    freed = _open(config).evict(args.name)  # ModelInUse is reported by the sdagent command
    print(f"evicted {args.name}: {_size(freed)} freed" if freed else f"{args.name} is not cached")
    return ExitCode.OK


def _verify(args: argparse.Namespace, config: CacheConfig) -> int:
    results = _open(config).verify(args.name)
    for result in results:
        print(f"{result.status:8} {result.name}{': ' + result.detail if result.detail else ''}")
    bad = [r for r in results if r.status in ("corrupt", "missing")]
    return ExitCode.FAILURE if bad else ExitCode.OK


def _index(args: argparse.Namespace, config: CacheConfig) -> int:
    source = build_source(config, args.index_source)
    started = time.perf_counter()

    def progress(entry: ModelEntry, hashed: bool) -> None:
        print(f"{'hashed' if hashed else 'kept':7} {entry.kind:10} {_size(entry.size):>9}  {entry.name}",
              file=sys.stderr if args.output == "-" else sys.stdout, flush=True)  # fmt: skip

    manifest = build_manifest(source, reuse=not args.rehash, workers=args.workers, on_file=progress)
    if args.output == "-":
        sys.stdout.write(manifest.dumps())
    elif args.output:
        Path(args.output).write_text(manifest.dumps())
    else:
        source.write_manifest(manifest)
    where = args.output or f"{source.url.rstrip('/')}/manifest.json"
    total = sum(entry.size for entry in manifest)
    print(f"{len(manifest)} models, {_size(total)}, in {time.perf_counter() - started:.1f} s -> {where}",
          file=sys.stderr if args.output == "-" else sys.stdout)  # fmt: skip
    return ExitCode.OK


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
