-- Keys that sign keyward's JWTs. The private half is encrypted with the server's master key;
-- a retired key still verifies tokens it signed until they have all expired.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    algorithm   TEXT NOT NULL,
    public_key  BLOB NOT NULL,
    private_key BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);
