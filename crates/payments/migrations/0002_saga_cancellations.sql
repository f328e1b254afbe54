-- Orders cancelled before payments saw them: a late OrderPlaced must not authorize.
CREATE TABLE saga_cancellations (
    order_id     TEXT PRIMARY KEY,
    cancelled_at BIGINT NOT NULL
);
