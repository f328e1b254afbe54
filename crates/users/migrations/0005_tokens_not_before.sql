-- Access tokens issued at or before this time (Unix seconds) are refused by the gateway:
-- set when an account is disabled or its role changes, published in the revocation list
-- for as long as such tokens can live, whatever the account's status afterwards.
ALTER TABLE users ADD COLUMN tokens_not_before BIGINT NOT NULL DEFAULT 0;
CREATE INDEX users_status ON users (status);
