CREATE TABLE stock (
    product_id  TEXT PRIMARY KEY,
    on_hand     BIGINT NOT NULL,
    reserved    BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
