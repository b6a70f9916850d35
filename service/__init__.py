"""ragcache: a cache-first RAG answer service."""

__version__ = "0.1.0"
