-- Optimistic concurrency for profile updates (ETag / If-Match) and addresses.
ALTER TABLE users ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN addresses TEXT NOT NULL DEFAULT '[]';

-- Refresh tokens, rotated on every use. Only their SHA-256 is stored. Every token issued
-- from one login shares a family; presenting a token that was already used revokes the
-- whole family (RFC 9700 §4.14.2).
CREATE TABLE refresh_tokens (
    id         TEXT PRIMARY KEY,
    family     TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
