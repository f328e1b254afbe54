CREATE TABLE payments (
    id              TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    card_brand      TEXT NOT NULL,
    card_last4      TEXT NOT NULL,
    status          TEXT NOT NULL,
    decline_code    TEXT,
    captured_minor  BIGINT NOT NULL,
    refunded_minor  BIGINT NOT NULL,
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX payments_user_created ON payments (user_id, created_at);
CREATE INDEX payments_user_order ON payments (user_id, order_id, created_at);
