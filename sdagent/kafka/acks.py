"""Waits for the broker's acknowledgement of particular records, not of a whole producer queue.

A producer shared by many threads (the client's submissions, the agent's answers) must not make
one caller wait for everybody's records: ``flush()`` does exactly that.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import KafkaError, Message, Producer

POLL_S = 0.005  # delivery reports arrive within a broker round trip; poll often


class Deliveries:
    """Counts outstanding deliveries of one durable produce and keeps the first error."""

    def __init__(self) -> None:
        self.pending = 0
        self.error: KafkaError | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def expect(self) -> None:
        with self._lock:
            self.pending += 1
            self.done.clear()

    def __call__(self, error: KafkaError | None, _message: Message) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

    def wait(self, producer: Producer, timeout_s: float) -> str | None:
        """Serve delivery reports until these records are acknowledged; the problem, or None."""
        deadline = time.monotonic() + timeout_s
        while not self.done.is_set() and time.monotonic() < deadline:
            producer.poll(POLL_S)
        if not self.done.is_set():
            return "not acknowledged in time"
        return None if self.error is None else str(self.error)
