"""The manifest format, kinds from store folders, and building a manifest from a directory store."""

from __future__ import annotations

import hashlib
import json

import pytest

from sdagent.cache import CacheError, Manifest, ModelEntry, ModelNotFound
from sdagent.cache.indexer import build_manifest
from sdagent.cache.manifest import kind_and_name
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import InstrumentedSource

SHA = "ab" * 32


def test_manifest_round_trips_and_ignores_fields_it_does_not_know():
    text = json.dumps({"version": 1, "models": [
        {"name": "sdxl.safetensors", "size": 10, "sha256": SHA.upper(), "kind": "checkpoint", "future": 1},
        {"name": "style.safetensors", "size": 5, "sha256": SHA, "kind": "lora", "path": "Lora/style.safetensors"},
    ]})  # fmt: skip

    manifest = Manifest.loads(text)

    assert manifest.get("sdxl.safetensors").sha256 == SHA  # lower-cased
    assert manifest.get("style.safetensors").local_path == "loras/style.safetensors"
    assert manifest.get("style.safetensors").source_path == "Lora/style.safetensors"
    assert Manifest.loads(manifest.dumps()).names() == manifest.names()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "../etc/passwd", "size": 1, "sha256": SHA}, "name"),
        ({"name": "/abs.ckpt", "size": 1, "sha256": SHA}, "name"),
        ({"name": "a.ckpt", "size": -1, "sha256": SHA}, "size"),
        ({"name": "a.ckpt", "size": 1, "sha256": "xyz"}, "sha256"),
        ({"name": "a.ckpt", "size": 1, "sha256": SHA, "kind": "unet"}, "kind"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_field(model, message):
    with pytest.raises(CacheError, match=f"models.0.{message}"):
        Manifest.loads(json.dumps({"version": 1, "models": [model]}))


def test_duplicate_names_and_unknown_versions_are_refused():
    entry = {"name": "a.ckpt", "size": 1, "sha256": SHA}
    with pytest.raises(CacheError, match="twice"):
        Manifest.loads(json.dumps({"models": [entry, entry]}))
    with pytest.raises(CacheError, match="newer"):
        Manifest.loads(json.dumps({"version": 99, "models": []}))


def test_names_resolve_with_or_without_their_suffix_unless_ambiguous():
    manifest = Manifest([ModelEntry(name="a.safetensors", size=1, sha256=SHA),
                         ModelEntry(name="b.safetensors", size=1, sha256=SHA),
                         ModelEntry(name="b.ckpt", size=1, sha256=SHA)])  # fmt: skip
    assert manifest.resolve("a").name == "a.safetensors"
    with pytest.raises(ModelNotFound, match="ambiguous"):
        manifest.resolve("b")
    with pytest.raises(ModelNotFound):
        manifest.resolve("c")


def test_diff_names_added_changed_and_removed_models():
    old = Manifest([ModelEntry(name="a", size=1, sha256=SHA), ModelEntry(name="b", size=1, sha256=SHA)])
    new = Manifest([ModelEntry(name="a", size=1, sha256="cd" * 32), ModelEntry(name="c", size=1, sha256=SHA)])
    diff = old.diff(new)
    assert (diff.added, diff.changed, diff.removed) == (("c",), ("a",), ("b",))
    assert not new.diff(new)


@pytest.mark.parametrize(
    ("path", "kind", "name"),
    [
        ("Stable-diffusion/sdxl.safetensors", "checkpoint", "sdxl.safetensors"),
        ("checkpoints/sub/x.ckpt", "checkpoint", "sub/x.ckpt"),
        ("Lora/detail.safetensors", "lora", "detail.safetensors"),
        ("VAE/vae-ft-mse.safetensors", "vae", "vae-ft-mse.safetensors"),
        ("embeddings/bad-hands.pt", "embedding", "bad-hands.pt"),
        ("sd15.safetensors", "checkpoint", "sd15.safetensors"),
        ("other/y.safetensors", "checkpoint", "other/y.safetensors"),
    ],
)
def test_kind_comes_from_the_top_folder_of_the_store(path, kind, name):
    assert kind_and_name(path) == (kind, name)


def test_index_hashes_model_files_and_reuses_unchanged_entries(tmp_path):
    store = tmp_path / "store"
    (store / "Lora").mkdir(parents=True)
    (store / "sd15.safetensors").write_bytes(b"s" * 1000)
    (store / "Lora" / "detail.safetensors").write_bytes(b"d" * 10)
    (store / "notes.txt").write_text("not a model")
    (store / ".hidden.safetensors").write_bytes(b"h")
    source = InstrumentedSource(DirectorySource(store, chunk=256))

    manifest = build_manifest(source)
    source.write_manifest(manifest)

    assert manifest.names() == ["detail.safetensors", "sd15.safetensors"]
    lora = manifest.get("detail.safetensors")
    assert (lora.kind, lora.path, lora.sha256) == (
        "lora",
        "Lora/detail.safetensors",
        hashlib.sha256(b"d" * 10).hexdigest(),
    )
    assert len(source.fetches) == 2

    (store / "sd15.safetensors").write_bytes(b"S" * 1000)
    again = build_manifest(source)
    assert len(source.fetches) == 3  # only the changed file was hashed again
    assert again.get("sd15.safetensors").sha256 == hashlib.sha256(b"S" * 1000).hexdigest()


def test_index_refuses_two_files_that_would_share_a_name(tmp_path):
    (tmp_path / "Lora").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"1")
    (tmp_path / "Lora" / "x.safetensors").write_bytes(b"2")
    with pytest.raises(CacheError, match="x.safetensors"):
        build_manifest(DirectorySource(tmp_path))
