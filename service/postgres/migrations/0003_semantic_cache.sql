-- The semantic cache: embeddings of cached questions, searched after an exact miss.
-- `scope` hashes everything in the exact key except the question (filters, top_k, model,
-- max_tokens, temperature, prompt version), so a match never crosses those. The answer
-- itself stays in Redis under `key`; when it is invalidated there, the row is dead too.
CREATE TABLE semantic_cache (
    key           text PRIMARY KEY,
    scope         text        NOT NULL,
    question      text        NOT NULL,  -- normalised and redacted, for the lexical guard
    question_hash text        NOT NULL,
    embedding     vector({embedding_dim}) NOT NULL,
    expires_at    timestamptz NOT NULL
);

CREATE INDEX semantic_cache_embedding_hnsw ON semantic_cache
    USING hnsw (embedding vector_cosine_ops) WITH (m = {hnsw_m}, ef_construction = {hnsw_ef_construction});
CREATE INDEX semantic_cache_scope ON semantic_cache (scope);
CREATE INDEX semantic_cache_expires ON semantic_cache (expires_at);
