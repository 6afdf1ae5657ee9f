"""sdagent: run Stable Diffusion jobs from Kafka on an elastic GPU fleet."""

__version__ = "0.1.0"
