-- API keys. Only a SHA-256 of the secret is stored: keys carry 256 random bits, so a slow
-- password hash would add latency without adding safety. `id` is the public prefix of the
-- key, used to find the row; the secret is then compared in constant time.
CREATE TABLE api_keys (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    secret_sha256  bytea NOT NULL,
    scopes         text[] NOT NULL,
    rpm            integer CHECK (rpm > 0),
    tokens_per_day integer CHECK (tokens_per_day > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
