"""hpr-serve: the OpenAI-compatible server (HTTP layer) and its batching engine (server.engine)."""
