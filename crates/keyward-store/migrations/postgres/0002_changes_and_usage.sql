-- Every change to a key that a cache must see, in order. Nodes poll it to invalidate their key
-- caches; old rows are pruned. Writers serialise on a lock of this table (see postgres.rs) so
-- that sequence numbers become visible in order and a poller never skips one.
CREATE TABLE key_changes (
    seq    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL,
    at     BIGINT NOT NULL
);

-- Requests per key and minute, by outcome. Written in batches by each node (upsert adds).
CREATE TABLE key_usage (
    key_id       TEXT COLLATE "C" NOT NULL,
    minute       BIGINT NOT NULL,
    allowed      BIGINT NOT NULL DEFAULT 0,
    unauthorized BIGINT NOT NULL DEFAULT 0,
    forbidden    BIGINT NOT NULL DEFAULT 0,
    rate_limited BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, minute)
);
