"""OpenAI-compatible HTTP gateway onto the request queues (`cplane gateway`)."""
