CREATE TABLE promotions (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    description  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    value        BIGINT NOT NULL,
    currency     TEXT,
    product_id   TEXT,
    category     TEXT,
    starts_at    BIGINT NOT NULL,
    ends_at      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX promotions_product_id ON promotions (product_id);
CREATE INDEX promotions_category ON promotions (category);
