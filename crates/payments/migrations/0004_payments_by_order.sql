-- The saga settles (captures or voids) a payment by its order: without this index every
-- settlement scanned the whole table, which grew quadratic under load.
CREATE INDEX payments_order ON payments (order_id);
