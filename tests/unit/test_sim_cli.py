"""The simulator's command line: every option reaches SimOptions, bad values are usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdagent.errors import ExitCode
from sdagent.sim.cli import build_parser, main, options_from_args
from sdagent.sim.faults import Fault, FaultKind


def test_flags_become_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--models", "a.safetensors", "b.safetensors=6500",
            "--models-dir", str(tmp_path), "--data-dir", str(tmp_path / "data"),
            "--initial-model", "none", "--step-latency-s", "0.2", "--load-latency-s", "3",
            "--switch-latency-s", "1", "--vram-total-mb", "16000", "--model-vram-mb", "1500",
            "--vram-per-megapixel-mb", "800", "--ram-cache-models", "3", "--seed", "7",
            "--fault", "error:2:status=503", "--fault", "hang",
        ]
    )  # fmt: skip
    options = options_from_args(args)
    assert options.models == ("a.safetensors", "b.safetensors")
    assert options.declared_models == {"a.safetensors": 1500, "b.safetensors": 6500}
    assert options.models_dir == tmp_path and options.data_dir == tmp_path / "data"
    assert options.initial_model is None
    assert (options.step_latency_s, options.load_latency_s, options.switch_latency_s) == (0.2, 3.0, 1.0)
    assert (options.vram_total_mb, options.vram_per_megapixel_mb, options.ram_cache_models) == (16000, 800, 3)
    assert options.seed == 7
    assert options.faults == (Fault(FaultKind.ERROR, count=2, status=503), Fault(FaultKind.HANG))


def test_a_models_dir_alone_starts_with_no_checkpoint_of_its_own(tmp_path: Path) -> None:
    # A fresh instance with a model cache: the WebUI lists only what the cache stages into the folder.
    options = options_from_args(build_parser().parse_args(["--models", "--models-dir", str(tmp_path)]))
    assert options.models == () and options.models_dir == tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["--fault", "boom"],
        ["--step-latency-s", "-1"],
        ["--models", "a=big"],
        ["--initial-model", "zzz"],
        ["--models"],
    ],  # no model and no models dir: nothing to serve
)
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == ExitCode.USAGE
    assert "sdagent sim:" in capsys.readouterr().err
