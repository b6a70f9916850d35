"""Postgres adapters: connections, migrations, documents, retrieval, the semantic index, the corpus watcher."""
