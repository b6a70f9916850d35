-- The corpus: documents, their chunks with embeddings and full-text vectors.
-- {embedding_dim}, {hnsw_m} and {hnsw_ef_construction} are filled in from settings the
-- first time the schema is created; the corpus row records the model so it is never mixed.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE corpus (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    embedding_model text        NOT NULL,
    embedding_dim   integer     NOT NULL,
    -- bumped in the same transaction as every corpus change; part of the answer-cache key
    generation      bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE documents (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       text        NOT NULL,
    external_id  text        NOT NULL,
    uri          text        NOT NULL,
    title        text        NOT NULL DEFAULT '',
    content_hash text        NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    token_count  integer     NOT NULL,
    chunk_count  integer     NOT NULL,
    generation   bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, external_id)
);

CREATE TABLE chunks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id bigint  NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    -- copied from the document so filtered vector scans need no join
    source      text    NOT NULL,
    ordinal     integer NOT NULL,
    text        text    NOT NULL,
    token_count integer NOT NULL,
    embedding   vector({embedding_dim}) NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (document_id, ordinal)
);

CREATE INDEX chunks_embedding_hnsw ON chunks
    USING hnsw (embedding vector_cosine_ops) WITH (m = {hnsw_m}, ef_construction = {hnsw_ef_construction});
CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);
CREATE INDEX chunks_source ON chunks (source);
