"""structlog set-up: JSON lines under systemd or a pipe, readable columns on a terminal.

Only the command line calls :func:`configure_logging`; library modules just ask for a logger.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog and the standard library's logging through one renderer on stderr."""
    json_lines = fmt == "json" or (fmt == "auto" and (not sys.stderr.isatty() or "JOURNAL_STREAM" in os.environ))
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            # JSON needs the traceback as a string; the console renderer formats it itself.
            *([structlog.processors.format_exc_info] if json_lines else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric_level, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    # botocore logs every retry at INFO; the agent logs its own retries as events.
    logging.getLogger("botocore").setLevel(max(numeric_level, logging.WARNING))
    # httpx logs every request at INFO: the IMDS watcher alone would log four lines a poll.
    logging.getLogger("httpx").setLevel(max(numeric_level, logging.WARNING))
