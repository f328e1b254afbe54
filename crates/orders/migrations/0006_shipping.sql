-- The shipping address, copied from the user center when the order is placed (a snapshot:
-- later profile changes do not move a placed order). JSON, NULL when the account has none.
ALTER TABLE orders ADD COLUMN shipping_address TEXT;
