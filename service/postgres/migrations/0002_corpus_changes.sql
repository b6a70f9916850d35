-- Which documents each corpus generation replaced or deleted, written in the same transaction
-- as the change. The API reads it to drop cached answers that cited those documents, even for
-- changes made while no API process was listening.
CREATE TABLE corpus_changes (
    generation  bigint NOT NULL,
    document_id bigint NOT NULL,
    PRIMARY KEY (generation, document_id)
);
