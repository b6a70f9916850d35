"""Command-line entry points: `rag-serve` and `rag-admin`."""
