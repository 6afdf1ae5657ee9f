"""The simulator's checkpoint catalogue: names, A1111 aliases and hashes, staged files."""

from __future__ import annotations

import os
from pathlib import Path

from sdagent.backends.simulated import model_hash
from sdagent.sim.catalog import Catalog


def test_declared_models_are_hashed_and_answer_to_every_a1111_alias() -> None:
    catalog = Catalog({"sd15.safetensors": 2048, "sub/xl.safetensors": 6500})
    sd15 = catalog.get("sd15.safetensors")
    assert sd15 is not None and sd15.shorthash == model_hash("sd15.safetensors")
    assert sd15.title == f"sd15.safetensors [{sd15.shorthash}]"
    for alias in ("sd15", "sd15.safetensors", sd15.title, sd15.shorthash, sd15.sha256, f"sd15 [{sd15.shorthash}]"):
        assert catalog.resolve(alias) is sd15
    assert catalog.resolve("sub_xl").name == "sub/xl.safetensors"  # model_name joins folders with _
    assert catalog.resolve("missing") is None
    assert catalog.get("sub/xl.safetensors").size_mb == 6500


def test_staged_files_appear_after_refresh_unhashed(tmp_path: Path) -> None:
    catalog = Catalog({"sd15.safetensors": 2048}, tmp_path, default_size_mb=3000)
    (tmp_path / "new.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    assert catalog.names() == ["sd15.safetensors"]  # A1111 only rescans on refresh-checkpoints
    catalog.refresh()
    staged = catalog.get("new.safetensors")
    assert catalog.names() == ["new.safetensors", "sd15.safetensors"]
    assert staged is not None and staged.shorthash is None and staged.title == "new.safetensors"
    assert staged.size_mb == 3000 and staged.filename == str(tmp_path / "new.safetensors")


def test_refresh_if_changed_follows_the_folder_mtime(tmp_path: Path) -> None:
    catalog = Catalog({}, tmp_path)
    (tmp_path / "a.ckpt").write_bytes(b"")
    os.utime(tmp_path, (1, 1))  # make sure the mtime differs from the one seen at construction
    catalog.refresh_if_changed()
    assert catalog.names() == ["a.ckpt"]
