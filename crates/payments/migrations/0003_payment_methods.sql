-- The vault's sealing key. A payment method id is the card's brand, last four digits and
-- the (simulated) card network's standing answer for it, sealed with this key for one user:
-- nothing of the card number is kept, and placing an order writes nothing here.
CREATE TABLE vault_keys (
    id         BIGINT PRIMARY KEY,
    secret     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
