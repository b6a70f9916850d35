"""rag-ingest: load, chunk, embed and store documents."""
