"""Kafka: the record format, client settings, acks, the status publisher, the ledger, topics."""
