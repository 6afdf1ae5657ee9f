"""``sdagent cache ...`` as the operator runs it (the command's parser built as cli.py builds it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sdagent.cache import CacheConfig, ModelCache, ModelInUse
from sdagent.cache.cli import build_parser
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import model_bytes
from sdagent.errors import ExitCode


def keep_logging(fmt: str, level: str) -> None:
    """Leave structlog alone: configuring it here would bind later tests' loggers to a closed stream."""


@pytest.fixture
def store(tmp_path) -> Path:
    (tmp_path / "store" / "Lora").mkdir(parents=True)
    (tmp_path / "store" / "sd15.safetensors").write_bytes(model_bytes("sd15", 100_000))
    (tmp_path / "store" / "Lora" / "detail.safetensors").write_bytes(b"d" * 10)
    return tmp_path / "store"


@pytest.fixture
def sdagent(tmp_path, store):
    """Runs ``sdagent ARGS...`` with ``[cache]`` pointing at the tmp store and cache."""
    config = CacheConfig(dir=tmp_path / "cache", source=str(store), budget_bytes=1 << 30, min_free_bytes=0)
    parser = argparse.ArgumentParser(prog="sdagent")
    build_parser(parser.add_subparsers(metavar="COMMAND"), load_config=lambda path: config, setup_logging=keep_logging)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.handler(args)

    return run


def test_index_warm_ls_verify_evict(sdagent, store, tmp_path, capsys):
    assert sdagent("cache", "index", str(store)) == ExitCode.OK
    assert "2 models" in capsys.readouterr().out
    assert json.loads((store / "manifest.json").read_text())["models"][0]["name"] == "detail.safetensors"

    assert sdagent("cache", "warm", "sd15", "detail.safetensors", "nope") == ExitCode.FAILURE
    out = capsys.readouterr().out
    assert "staged  sd15.safetensors" in out and "FAILED  nope: ModelNotFound" in out

    assert sdagent("cache", "ls", "--json") == ExitCode.OK
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {m["name"]: m["kind"] for m in listed} == {"sd15.safetensors": "checkpoint", "detail.safetensors": "lora"}

    assert sdagent("cache", "verify") == ExitCode.OK
    assert capsys.readouterr().out.count("ok ") == 2

    assert sdagent("cache", "evict", "sd15") == ExitCode.OK
    assert "evicted sd15" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "checkpoints" / "sd15.safetensors").exists()
    assert sdagent("cache", "verify", "sd15") == ExitCode.FAILURE  # not on local disk


def test_index_to_stdout_leaves_the_store_alone(sdagent, store, capsys):
    assert sdagent("cache", "index", str(store), "--output", "-") == ExitCode.OK
    out = capsys.readouterr().out
    manifest = json.loads(out[out.index('{\n "version"') :])  # after structlog's default output, in tests
    assert [m["name"] for m in manifest["models"]] == ["detail.safetensors", "sd15.safetensors"]
    assert not (store / "manifest.json").exists()


def test_evicting_a_model_in_use_is_refused(sdagent, store, tmp_path):
    sdagent("cache", "index", str(store))
    cache = ModelCache(tmp_path / "cache", DirectorySource(store), budget_bytes=1 << 30)
    with cache.use("sd15"), pytest.raises(ModelInUse):  # `sdagent` prints it and exits 1
        sdagent("cache", "evict", "sd15")


def test_ls_works_without_a_source_and_cache_alone_prints_help(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdagent")
    build_parser(parser.add_subparsers(), load_config=lambda path: CacheConfig(dir=tmp_path / "c"),
                 setup_logging=keep_logging)  # fmt: skip
    args = parser.parse_args(["cache", "ls"])
    assert args.handler(args) == ExitCode.OK
    assert "0 models" in capsys.readouterr().out
    args = parser.parse_args(["cache"])
    assert args.handler(args) == ExitCode.USAGE


def test_config_rejects_a_relative_or_unknown_source():
    with pytest.raises(ValueError, match="absolute"):
        CacheConfig(source="models")
    with pytest.raises(ValueError, match="s3://"):
        CacheConfig(source="gs://bucket/x")
    with pytest.raises(ValueError, match="extra"):
        CacheConfig(budget=1)
    assert CacheConfig(source="s3://bucket/models/sd").source == "s3://bucket/models/sd"


def test_config_refuses_the_crt_client_with_a_custom_endpoint():
    with pytest.raises(ValueError, match="4839"):
        CacheConfig(source="s3://bucket/models", endpoint_url="http://127.0.0.1:9000", transfer_client="crt")
