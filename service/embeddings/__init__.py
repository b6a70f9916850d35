"""Text embeddings for questions and passages: the local encoder or an OpenAI-compatible endpoint."""
