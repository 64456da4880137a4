-- Bumped whenever remaining/refill is set through the API, so rate-limit backends that hold
-- the live credit count know to start over from the stored value.
ALTER TABLE api_keys ADD COLUMN credits_version BIGINT NOT NULL DEFAULT 0;
