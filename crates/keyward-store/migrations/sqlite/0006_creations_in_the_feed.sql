-- A key's creation is in the feed so that nodes learn its secret's hash, but it leaves nothing
-- cached anywhere to drop: nodes read this flag and do not invalidate for it. Rows written
-- before (and by older nodes) read as changes, which is what they were taken for.
ALTER TABLE key_changes ADD COLUMN created INTEGER NOT NULL DEFAULT 0;
