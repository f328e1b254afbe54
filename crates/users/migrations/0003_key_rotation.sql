-- Signing key rotation. A new key is published in the JWKS at once but signs only from
-- `activates_at` on, so every gateway has fetched it before the first token it signs
-- arrives; the key it replaces stays published until the tokens it signed have expired.
ALTER TABLE signing_keys ADD COLUMN activates_at BIGINT NOT NULL DEFAULT 0;
