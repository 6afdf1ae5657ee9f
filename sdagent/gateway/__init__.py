"""The HTTP gateway (``sdagent gateway``): applications submit jobs and read their status over
HTTP, without knowing Kafka or the WebUI behind it. See docs/gateway.md."""
