CREATE TABLE prices (
    product_id    TEXT PRIMARY KEY,
    amount_minor  BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    updated_at    BIGINT NOT NULL
);
