"""The agent: the loops that take jobs from Kafka and run them, and the one place that builds them."""
