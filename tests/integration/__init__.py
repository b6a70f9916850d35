"""Integration tests: the app and CLIs against real Postgres+pgvector, Valkey and the loopback providers."""
