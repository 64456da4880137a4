-- Times are Unix milliseconds (INTEGER); lists of strings and objects are JSON (TEXT).

CREATE TABLE orgs (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    tier               TEXT NOT NULL DEFAULT 'free',
    default_project_id TEXT,
    created_at         INTEGER NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT,
    created_at    INTEGER NOT NULL
);

CREATE TABLE memberships (
    org_id     TEXT NOT NULL REFERENCES orgs (id),
    user_id    TEXT NOT NULL REFERENCES users (id),
    role       TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE projects (
    id         TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL REFERENCES orgs (id),
    slug       TEXT NOT NULL,
    name       TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (org_id, slug)
);

CREATE TABLE api_keys (
    id                   TEXT PRIMARY KEY,
    org_id               TEXT NOT NULL REFERENCES orgs (id),
    project_id           TEXT NOT NULL REFERENCES projects (id),
    name                 TEXT NOT NULL,
    environment          TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    hint                 TEXT NOT NULL,
    scopes               TEXT NOT NULL,
    expires_at           INTEGER,
    allowed_ips          TEXT NOT NULL,
    blocked_ips          TEXT NOT NULL,
    endpoint             TEXT,
    quota_requests       INTEGER NOT NULL,
    quota_window         INTEGER NOT NULL,
    remaining            INTEGER,
    refill               TEXT,
    meta                 TEXT NOT NULL,
    created_at           INTEGER NOT NULL,
    created_by           TEXT NOT NULL,
    last_used_at         INTEGER,
    revoked_at           INTEGER,
    previous_valid_until INTEGER
);
CREATE INDEX api_keys_org_id ON api_keys (org_id, id);
CREATE INDEX api_keys_project_id ON api_keys (project_id, id);

-- Only SHA-256 hashes of secrets. valid_until NULL: the current secret; otherwise a previous
-- secret, valid until then (rotation grace), kept afterwards so it answers `key_expired`.
CREATE TABLE key_secrets (
    hash        BLOB PRIMARY KEY,
    key_id      TEXT NOT NULL REFERENCES api_keys (id),
    valid_until INTEGER,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX key_secrets_key_id ON key_secrets (key_id);

CREATE TABLE audit_log (
    id         TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    ip         TEXT,
    details    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX audit_log_org_id ON audit_log (org_id, id);

-- The audit log is append-only.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
