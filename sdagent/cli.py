"""The ``sdagent`` command line: the daemon, the client commands and the operator tools.

Only this module installs signal handlers and configures logging. Exit codes are
:class:`sdagent.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from sdagent.config import DEFAULT_CONFIG_PATH, Settings, load_settings
from sdagent.errors import ConfigError, ExitCode, KafkaUnavailable, MissingExtra, SdagentError
from sdagent.jobs import describe_validation_error
from sdagent.logs import configure_logging

if TYPE_CHECKING:
    from sdagent.agent.controls import Controls

log = structlog.get_logger("sdagent.cli")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return ExitCode.USAGE
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"sdagent: bad configuration: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except KafkaUnavailable as exc:
        print(f"sdagent: Kafka unavailable: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    except SdagentError as exc:
        print(f"sdagent: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except ValidationError as exc:
        print(f"sdagent: invalid job: {describe_validation_error(exc)}", file=sys.stderr)
        return ExitCode.USAGE
    except TimeoutError as exc:
        print(f"sdagent: {exc}", file=sys.stderr)
        return ExitCode.TIMEOUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdagent", description="Stable Diffusion jobs from Kafka on a GPU fleet")
    commands = parser.add_subparsers(metavar="COMMAND")

    run = commands.add_parser("run", help="run the agent daemon")
    _add_config(run, default=DEFAULT_CONFIG_PATH)
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help="submit a job (waits for it by default)")
    _add_config(submit)
    submit.add_argument("--job", type=Path, help="a JSON job file ('-' for stdin); flags below override it")
    submit.add_argument("--model")
    submit.add_argument("--prompt")
    submit.add_argument("--kind", choices=["txt2img", "img2img", "txt2vid", "workflow"])
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--job-id")
    submit.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="wait for the answer")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    submit.add_argument("--json", action="store_true", help="print the answer as JSON, no progress bar")
    submit.set_defaults(handler=_submit)

    cancel = commands.add_parser("cancel", help="cancel a job, queued or running")
    _add_config(cancel)
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=_cancel)

    check = commands.add_parser("check-config", help="validate a configuration file; names the bad key")
    _add_config(check, default=DEFAULT_CONFIG_PATH)
    check.set_defaults(handler=_check_config)

    schema = commands.add_parser("schema", help="print the job JSON Schema")
    schema.set_defaults(handler=_schema)

    topics = commands.add_parser("topics", help="manage the agent's topics")
    topic_commands = topics.add_subparsers(metavar="ACTION")
    create = topic_commands.add_parser("create", help="create missing topics")
    _add_config(create)
    create.add_argument("--replication-factor", type=int, help="override topics.replication_factor")
    create.set_defaults(handler=_topics_create)

    sim = commands.add_parser("sim", help="run the WebUI SIMULATOR (A1111 + ComfyUI APIs) for tests and demos")
    from sdagent.sim.cli import build_parser as add_sim_flags

    add_sim_flags(sim)
    sim.set_defaults(handler=_sim)

    from sdagent.cache.cli import build_parser as add_cache_commands

    add_cache_commands(commands)

    gateway = commands.add_parser("gateway", help="serve the HTTP API in front of the jobs topic (docs/gateway.md)")
    _add_config(gateway, default=DEFAULT_CONFIG_PATH)
    gateway.add_argument("--port", type=int, help="override gateway.port")
    gateway.set_defaults(handler=_gateway)
    gateway_commands = gateway.add_subparsers(metavar="ACTION")
    hash_key = gateway_commands.add_parser("hash-key", help="make a new API key and print it with its SHA-256")
    hash_key.set_defaults(handler=_gateway_hash_key)

    fleet = commands.add_parser("fleet", help="the fleet at full scale (docs/fleet-simulation.md)")
    fleet_commands = fleet.add_subparsers(metavar="ACTION")
    simulate = fleet_commands.add_parser("simulate", help="simulate a scenario on the shipped scaling policy")
    from sdagent.fleetsim.cli import add_simulate

    add_simulate(simulate)
    simulate.set_defaults(handler=_fleet_simulate)

    devstack = commands.add_parser("devstack", help="local Kafka + moto + simulated backend + agent, run demo jobs")
    devstack.add_argument("--jobs", type=int, default=5, help="how many demo jobs (default 5)")
    devstack.set_defaults(handler=_devstack)
    return parser


def _add_config(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    parser.add_argument("--config", type=Path, default=default, help=f"TOML config (default {default or 'none'})")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    return load_settings(args.config, overrides)


# --- gateway ---------------------------------------------------------------------------------


def _gateway(args: argparse.Namespace) -> int:
    serve = _from_extra("gateway", "sdagent.gateway.server", "serve")

    settings = _settings(args)
    if args.port is not None:
        settings.gateway.port = args.port
    configure_logging(settings.logging.format, settings.logging.level)
    serve(settings)
    return ExitCode.OK


def _gateway_hash_key(_args: argparse.Namespace) -> int:
    from sdagent.gateway.auth import new_key

    key, digest = new_key()
    print(f"key (give it to the caller; it is not stored): {key}")
    print(f'config:  [[gateway.api_keys]]\n         name = "CALLER"\n         sha256 = "{digest}"')
    return ExitCode.OK


# --- run -------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from sdagent.agent.build import build_agent
    from sdagent.heap import freeze_startup_heap

    settings = _settings(args)
    configure_logging(settings.logging.format, settings.logging.level)
    agent = build_agent(settings, os.environ)
    _install_signal_handlers(agent.controls)
    try:
        agent.start()
        freeze_startup_heap()  # before the first job: a full GC pass then skips all of start-up
        agent.run()
        agent.drain()
    finally:
        agent.stop()
    if agent.prewarm_running:
        _exit_without_waiting_for_the_prewarm()
    return ExitCode.OK


def _exit_without_waiting_for_the_prewarm() -> None:
    """Stopped during boot (a spot notice, a scale-in): the agent is stopped, but the prewarm's
    threads (the cache's pool, boto3's transfer threads) would hold the interpreter's exit until
    their downloads end, minutes for a large model. The partial download resumes at the next start;
    the cache's state file only ever changes by an atomic rename; the kernel drops the locks."""
    structlog.get_logger(__name__).warning("agent.exit_during_prewarm")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(ExitCode.OK)


def _install_signal_handlers(controls: Controls) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        if controls.stopping.is_set():
            controls.force()  # a second signal: release the job in flight now and leave
        controls.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# --- client commands -------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    from sdagent.client import Client
    from sdagent.progress import ProgressView

    settings = _settings(args)
    configure_logging("console", "warning")
    job = _job_from_args(args)
    with Client(settings.kafka, settings.topics) as client:
        if not args.wait:
            queued = client.submit(job)
            print(json.dumps({"job_id": queued.job_id, "status": "queued"}) if args.json else queued.job_id)
            return ExitCode.OK
        view = ProgressView(enabled=not args.json)
        with view:
            answer = client.run(job, timeout_s=args.timeout, on_event=view.update)
    print(answer.model_dump_json(indent=2, exclude_none=True) if args.json else view.summary(answer))
    return ExitCode.OK if answer.status.value == "succeeded" else ExitCode.FAILURE


def _job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {}
    if args.job is not None:
        text = sys.stdin.read() if str(args.job) == "-" else args.job.read_text()
        job = json.loads(text)
    for flag, field in (
        ("model", "model"),
        ("prompt", "prompt"),
        ("kind", "kind"),
        ("width", "width"),
        ("height", "height"),
        ("steps", "steps"),
        ("seed", "seed"),
        ("job_id", "job_id"),
    ):
        value = getattr(args, flag)
        if value is not None:
            job[field] = value
    return job


def _cancel(args: argparse.Namespace) -> int:
    from sdagent.client import Client

    settings = _settings(args)
    configure_logging("console", "warning")
    with Client(settings.kafka, settings.topics) as client:
        client.cancel(args.job_id)
    print(f"cancel requested for {args.job_id}")
    return ExitCode.OK


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)  # a bad key raises ConfigError: exit 78 with its name
    print(
        f"{args.config}: OK (backend {settings.backend.kind}, jobs topic {settings.topics.jobs}, "
        f"group {settings.kafka.group_id})"
    )
    return ExitCode.OK


def _schema(_args: argparse.Namespace) -> int:
    from sdagent.jobs import job_json_schema

    print(json.dumps(job_json_schema(), indent=2))
    return ExitCode.OK


def _topics_create(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from sdagent.kafka.clients import admin_config
    from sdagent.kafka.share_group import configure_lane_groups, share_group_settings
    from sdagent.kafka.topics import create_topics

    settings = _settings(args)
    configure_logging(settings.logging.format, settings.logging.level)
    admin = AdminClient(admin_config(settings.kafka))
    share = settings.kafka.consumption == "share"
    outcome = create_topics(admin, settings.topics, args.replication_factor, share=share)
    for name, state in outcome.items():
        print(f"{name}: {state}")
    if share:
        # Before any agent joins: a share group's default reset would skip the queued jobs.
        settings_text = ", ".join(f"{k}={v}" for k, v in share_group_settings(settings.kafka.share).items())
        for group in configure_lane_groups(admin, settings.kafka.group_id, settings.kafka.share, settings.topics):
            print(f"share group {group}: {settings_text}")
    return ExitCode.OK


def _sim(args: argparse.Namespace) -> int:
    _from_extra("sim", "sdagent.sim.server", "run")  # aiohttp: imported by run_from_args, named here
    from sdagent.sim.cli import run_from_args

    return run_from_args(args)


def _fleet_simulate(args: argparse.Namespace) -> int:
    _from_extra("fleetsim", "sdagent.fleetsim.fleet", "Fleet")  # simpy, numpy, matplotlib: named if missing
    from sdagent.fleetsim.cli import run_from_args

    return run_from_args(args)


def _devstack(args: argparse.Namespace) -> int:
    run_demo = _from_extra("sim", "sdagent.devstack.stack", "run_demo")

    configure_logging("console", "warning")
    return run_demo(jobs=args.jobs)


def _from_extra(extra: str, module: str, name: str) -> Any:
    """``module.name``, or MissingExtra naming the extra that installs what ``module`` imports."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "sdagent":
            raise  # our own module missing is a broken install, not an extra
        raise MissingExtra(extra, exc.name) from None


if __name__ == "__main__":
    sys.exit(main())
