-- Every change to a key that a cache must see, in order. Nodes poll it (and PostgreSQL will
-- also notify) to invalidate their key caches; old rows are pruned.
CREATE TABLE key_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    at     INTEGER NOT NULL
);

-- Requests per key and minute, by outcome. Written in batches by each node (upsert adds).
CREATE TABLE key_usage (
    key_id       TEXT NOT NULL,
    minute       INTEGER NOT NULL,
    allowed      INTEGER NOT NULL DEFAULT 0,
    unauthorized INTEGER NOT NULL DEFAULT 0,
    forbidden    INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, minute)
) WITHOUT ROWID;
