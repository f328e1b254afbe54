CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    sku         TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    category    TEXT NOT NULL,
    attributes  TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX products_category ON products (category, sku);
