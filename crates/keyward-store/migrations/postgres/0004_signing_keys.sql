-- Keys that sign keyward's JWTs. The private half is encrypted with the server's master key;
-- a retired key still verifies tokens it signed until they have all expired.
CREATE TABLE signing_keys (
    kid         TEXT COLLATE "C" PRIMARY KEY,
    algorithm   TEXT NOT NULL,
    public_key  BYTEA NOT NULL,
    private_key BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);
