"""Benchmarks and retrieval evaluation; numbers go to docs/benchmarks.md."""
