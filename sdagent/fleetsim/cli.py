"""``sdagent fleet simulate SCENARIO.yaml``: runs a scenario, writes its report directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="a scenario file (fleet/scenarios/*.yaml)")
    parser.add_argument("--out", type=Path, help="report directory (default reports/SCENARIO-NAME)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key (dotted, value in YAML), e.g. intake.mode=partition; repeatable",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    # Imported here: the parser is built without the fleetsim extra installed.
    from sdagent.fleetsim import report
    from sdagent.fleetsim.fleet import Fleet
    from sdagent.fleetsim.scenario import load
    from sdagent.fleetsim.summary import summarise

    try:
        scenario = load(args.scenario, _overrides(args.set))
        fleet = Fleet(scenario)
    except (OSError, ValueError) as error:
        print(f"sdagent fleet simulate: {error}", file=sys.stderr)
        return 2
    fleet.run(progress=not args.no_progress)
    summary = summarise(fleet)
    out = args.out or Path("reports") / scenario.name
    report.write(out, fleet.recorder, summary)
    print(report.text(summary), end="")
    print(f"report: {out}")
    print(json.dumps(summary))
    return 0


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides
