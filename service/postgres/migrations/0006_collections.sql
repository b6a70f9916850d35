-- Collections: every document belongs to exactly one, and every API key lists those it may read.
-- Existing documents go to `default`; existing query keys read `default`, admin keys read all
-- (`*`, a token of its own: every collection, including those created later).
ALTER TABLE documents ADD COLUMN collection text NOT NULL DEFAULT 'default';
ALTER TABLE documents DROP CONSTRAINT documents_source_external_id_key;
ALTER TABLE documents ADD CONSTRAINT documents_collection_source_external_id_key
    UNIQUE (collection, source, external_id);

-- copied from the document, like `source`, so filtered vector scans need no join
ALTER TABLE chunks ADD COLUMN collection text NOT NULL DEFAULT 'default';
CREATE INDEX chunks_collection ON chunks (collection);

ALTER TABLE api_keys ADD COLUMN collections text[] NOT NULL DEFAULT '{default}'
    CHECK (cardinality(collections) > 0);
UPDATE api_keys SET collections = '{*}' WHERE 'admin' = ANY (scopes);
