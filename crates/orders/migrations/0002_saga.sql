-- The saga's state per order, its timeline, and the request fingerprint behind an
-- Idempotency-Key.
ALTER TABLE orders ADD COLUMN stock_state TEXT NOT NULL DEFAULT 'PENDING';
ALTER TABLE orders ADD COLUMN payment_state TEXT NOT NULL DEFAULT 'PENDING';
ALTER TABLE orders ADD COLUMN request_hash TEXT;
CREATE INDEX orders_pending ON orders (status, created_at);

CREATE TABLE order_steps (
    id       TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    step     TEXT NOT NULL,
    detail   TEXT,
    at       BIGINT NOT NULL
);
CREATE INDEX order_steps_by_order ON order_steps (order_id, id);
