-- Usage rows ordered by minute first: a flush updates the current minute's rows, which now
-- sit together instead of one per key's stretch of the table. Flushing 10,000 keys again
-- within a minute went from ~175 ms to ~19 ms of CPU (the first flush of a minute, which
-- inserts, costs about the same as before). Reads by key go through the index.
CREATE TABLE key_usage_by_minute (
    key_id       TEXT NOT NULL,
    minute       INTEGER NOT NULL,
    allowed      INTEGER NOT NULL DEFAULT 0,
    unauthorized INTEGER NOT NULL DEFAULT 0,
    forbidden    INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, key_id)
) WITHOUT ROWID;
INSERT INTO key_usage_by_minute (key_id, minute, allowed, unauthorized, forbidden, rate_limited)
    SELECT key_id, minute, allowed, unauthorized, forbidden, rate_limited FROM key_usage;
DROP TABLE key_usage;
ALTER TABLE key_usage_by_minute RENAME TO key_usage;
CREATE INDEX key_usage_by_key ON key_usage (key_id, minute);
