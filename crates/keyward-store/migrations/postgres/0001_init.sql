-- The PostgreSQL twin of migrations/sqlite: same tables, columns and meaning, so both backends
-- share their row decoding. Times are Unix milliseconds (BIGINT); lists of strings and objects
-- are JSON kept as TEXT (byte for byte what was written). Identifiers compare bytewise
-- (COLLATE "C") because lists page by id, whatever the database's default collation.

CREATE TABLE orgs (
    id                 TEXT COLLATE "C" PRIMARY KEY,
    name               TEXT NOT NULL,
    tier               TEXT NOT NULL DEFAULT 'free',
    default_project_id TEXT COLLATE "C",
    created_at         BIGINT NOT NULL
);

-- SQLite's `UNIQUE COLLATE NOCASE`: one account per address, whatever its case.
CREATE TABLE users (
    id            TEXT COLLATE "C" PRIMARY KEY,
    email         TEXT NOT NULL,
    password_hash TEXT,
    created_at    BIGINT NOT NULL
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE memberships (
    org_id     TEXT COLLATE "C" NOT NULL REFERENCES orgs (id),
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    role       TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE projects (
    id         TEXT COLLATE "C" PRIMARY KEY,
    org_id     TEXT COLLATE "C" NOT NULL REFERENCES orgs (id),
    slug       TEXT NOT NULL,
    name       TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, slug)
);

CREATE TABLE api_keys (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    org_id               TEXT COLLATE "C" NOT NULL REFERENCES orgs (id),
    project_id           TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    name                 TEXT NOT NULL,
    environment          TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    hint                 TEXT NOT NULL,
    scopes               TEXT NOT NULL,
    expires_at           BIGINT,
    allowed_ips          TEXT NOT NULL,
    blocked_ips          TEXT NOT NULL,
    endpoint             TEXT,
    quota_requests       BIGINT NOT NULL,
    quota_window         BIGINT NOT NULL,
    remaining            BIGINT,
    refill               TEXT,
    meta                 TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    created_by           TEXT NOT NULL,
    last_used_at         BIGINT,
    revoked_at           BIGINT,
    previous_valid_until BIGINT
);
CREATE INDEX api_keys_org_id ON api_keys (org_id, id);
CREATE INDEX api_keys_project_id ON api_keys (project_id, id);

-- Only SHA-256 hashes of secrets. valid_until NULL: the current secret; otherwise a previous
-- secret, valid until then (rotation grace), kept afterwards so it answers `key_expired`.
CREATE TABLE key_secrets (
    hash        BYTEA PRIMARY KEY,
    key_id      TEXT COLLATE "C" NOT NULL REFERENCES api_keys (id),
    valid_until BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX key_secrets_key_id ON key_secrets (key_id);

CREATE TABLE audit_log (
    id         TEXT COLLATE "C" PRIMARY KEY,
    org_id     TEXT COLLATE "C" NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    ip         TEXT,
    details    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX audit_log_org_id ON audit_log (org_id, id);

-- The audit log is append-only: rows can be neither changed nor removed, TRUNCATE included.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
