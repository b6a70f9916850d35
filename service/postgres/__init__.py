"""Postgres adapters: connections, migrations, documents, retrieval, semantic index, corpus watcher, NOTIFY relay."""
