"""``sdagent sim`` / ``python -m sdagent.sim``: run the WebUI simulator in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdagent.errors import ExitCode
from sdagent.logs import configure_logging
from sdagent.sim import options as defaults
from sdagent.sim.faults import Fault
from sdagent.sim.options import SimOptions, parse_model_spec

DEFAULT_PORT = 7861  # A1111's --nowebui port; ComfyUI's API answers on the same port here


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Serve with parsed flags (``sdagent sim`` parses them into its own subcommand)."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"sdagent sim: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(args.log_format, args.log_level)
    from sdagent.sim.server import run  # imported late: aiohttp is only needed to serve

    run(args.host, args.port, options)
    return ExitCode.OK


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The simulator's flags; pass a parser (e.g. a subcommand's) to add them to it."""
    parser = parser or argparse.ArgumentParser(
        prog="sdagent sim",
        description="Simulated Stable Diffusion WebUI: AUTOMATIC1111 and ComfyUI HTTP APIs on one port, no GPU.",
    )
    parser.add_argument("--host", "--server-name", dest="host", default="127.0.0.1")  # A1111 calls it --server-name
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--models", nargs="*", metavar="NAME[=MB]", default=list(defaults.DEFAULT_MODELS),
        help="checkpoint names the simulator offers, each optionally with its VRAM size in MB "
        "(none, with --models-dir: only the staged files, as on a fresh instance with a model cache)",
    )  # fmt: skip
    parser.add_argument(
        "--models-dir", type=Path, help="checkpoint files staged here are offered too (after a refresh)"
    )
    parser.add_argument("--data-dir", type=Path, help="ComfyUI input/output/temp dirs (default: a temporary dir)")
    parser.add_argument(
        "--initial-model", default="", help="model loaded at start ('none': no model; default: the first)"
    )
    parser.add_argument("--step-latency-s", type=float, default=defaults.DEFAULT_STEP_LATENCY_S)
    parser.add_argument(
        "--load-latency-s", type=float, default=defaults.DEFAULT_LOAD_LATENCY_S, help="cold model load from disk"
    )
    parser.add_argument(
        "--switch-latency-s",
        type=float,
        default=defaults.DEFAULT_SWITCH_LATENCY_S,
        help="load of a model still warm in RAM",
    )
    parser.add_argument("--vram-total-mb", type=int, default=defaults.DEFAULT_VRAM_TOTAL_MB)
    parser.add_argument(
        "--model-vram-mb", type=int, default=defaults.DEFAULT_MODEL_VRAM_MB, help="VRAM of a model without =MB"
    )
    parser.add_argument(
        "--vram-per-megapixel-mb",
        type=int,
        default=defaults.DEFAULT_VRAM_PER_MEGAPIXEL_MB,
        help="sampling memory per megapixel of batch",
    )
    parser.add_argument(
        "--ram-cache-models", type=int, default=defaults.DEFAULT_RAM_CACHE_MODELS, help="models kept warm in RAM"
    )
    parser.add_argument(
        "--fault", action="append", default=[], metavar="KIND[:COUNT][:KEY=VALUE,...]",
        help="arm a fault: error, slow, hang, crash, oom, ws_drop "
        "(COUNT -1: forever; keys: api, scope, status, delay_s)",
    )  # fmt: skip
    parser.add_argument("--no-hashing", action="store_true", help="as A1111's: checkpoints never get a hash")
    parser.add_argument(
        "--history-delay-s", type=float, default=defaults.DEFAULT_HISTORY_DELAY_S,
        help="ComfyUI: how long after execution_success the history entry appears",
    )  # fmt: skip
    parser.add_argument(
        "--preview-method", choices=["none", "auto", "latent2rgb", "taesd"], default="none",
        help="as ComfyUI's: anything but none sends a binary preview frame per sampler step",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="seeds the generator behind seed -1, for reproducible runs")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    parser.add_argument("--log-level", default="info")
    return parser


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """Validate the parsed flags into SimOptions; raises ValueError naming the bad flag."""
    models, sizes = [], {}
    for spec in args.models:
        name, size = parse_model_spec(spec)
        models.append(name)
        if size is not None:
            sizes[name] = size
    faults = []
    for spec in args.fault:
        try:
            faults.append(Fault.parse(spec))
        except ValueError as exc:
            raise ValueError(f"--fault {spec}: {exc}") from None
    return SimOptions(
        models=tuple(models),
        model_sizes_mb=sizes,
        models_dir=args.models_dir,
        data_dir=args.data_dir,
        initial_model=None if args.initial_model == "none" else args.initial_model,
        step_latency_s=args.step_latency_s,
        load_latency_s=args.load_latency_s,
        switch_latency_s=args.switch_latency_s,
        vram_total_mb=args.vram_total_mb,
        model_vram_mb=args.model_vram_mb,
        vram_per_megapixel_mb=args.vram_per_megapixel_mb,
        ram_cache_models=args.ram_cache_models,
        faults=tuple(faults),
        seed=args.seed,
        hashing=not args.no_hashing,
        history_delay_s=args.history_delay_s,
        previews=args.preview_method != "none",
    )
