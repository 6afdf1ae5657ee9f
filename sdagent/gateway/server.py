"""``sdagent gateway``: builds the gateway's parts from the configuration and serves it (uvicorn).

Start: a bad ``[gateway]`` (no API key and no explicit ``allow_anonymous``) stops with exit 78;
the status view starts reading the results topic (``/readyz`` says 503 until it has caught up);
then uvicorn serves. SIGTERM: uvicorn stops accepting, finishes the requests in flight, then the
producer is flushed and the reader closed.
"""

from __future__ import annotations

import math
import socket
from contextlib import asynccontextmanager

import structlog
import uvicorn
from confluent_kafka import Consumer
from fastapi import FastAPI

from sdagent.config import Settings
from sdagent.gateway.app import GatewayParts, create_app
from sdagent.gateway.auth import Gatekeeper
from sdagent.gateway.protocol import with_headers_timeout
from sdagent.gateway.queue import JobQueue
from sdagent.gateway.status import StatusView
from sdagent.gateway.webhooks import WebhookDispatcher
from sdagent.heap import freeze_startup_heap
from sdagent.kafka.clients import reader_config

log = structlog.get_logger(__name__)


def build_app(settings: Settings, gateway_id: str | None = None) -> FastAPI:
    """The gateway app with its Kafka parts, started and stopped with the app's lifespan."""
    config = settings.gateway
    gatekeeper = Gatekeeper(config)  # raises ConfigError before anything connects
    gateway_id = gateway_id or socket.gethostname()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue = JobQueue(settings.kafka, settings.topics, gateway_id, delivery_timeout_s=config.delivery_timeout_s)
        view = StatusView(Consumer(reader_config(settings.kafka, "gateway-status")), settings.topics.results,
                          window_s=config.status_window_s, max_jobs=config.status_max_jobs)  # fmt: skip
        view.start()
        webhooks = None
        if config.webhooks.enabled:
            webhooks = WebhookDispatcher(settings.kafka, settings.topics.results, config.webhooks, member_id=gateway_id)
            webhooks.start()
        app.state.parts = GatewayParts(config, settings.limits, queue, view, gatekeeper, queue.broker_reachable)
        log.info("gateway.started", gateway_id=gateway_id, jobs_topic=settings.topics.jobs,
                 webhooks=webhooks is not None)  # fmt: skip
        try:
            yield
        finally:
            if webhooks is not None:
                webhooks.stop()
            queue.close()
            view.stop()
            log.info("gateway.stopped")

    app = create_app()  # the lifespan gives it its parts once Kafka is connected
    app.router.lifespan_context = lifespan
    return app


def serve(settings: Settings) -> None:
    app = build_app(settings)
    freeze_startup_heap()  # a full GC pass then skips the imports and the app: no request waits on it
    config = settings.gateway
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False,
                http=with_headers_timeout(config.headers_timeout_s), timeout_keep_alive=config.keep_alive_timeout_s,
                timeout_graceful_shutdown=math.ceil(config.max_wait_s + 5))  # fmt: skip
