-- Per-key cap on answers in flight at once (misses: generated, or waiting on a shared generation).
-- Existing keys keep no cap (NULL); `rag-admin keys create` gives new keys RAG_DEFAULT_MAX_INFLIGHT.
ALTER TABLE api_keys ADD COLUMN max_inflight integer CHECK (max_inflight > 0);
