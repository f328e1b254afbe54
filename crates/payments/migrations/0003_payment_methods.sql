-- Vaulted cards. The number itself is never kept: brand, last four digits, and the
-- (simulated) card network's standing answer for the card, which is what a network token
-- would resolve to at the issuer: 'authorize' or 'decline:<code>'.
CREATE TABLE payment_methods (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    card_brand      TEXT NOT NULL,
    card_last4      TEXT NOT NULL,
    network_verdict TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX payment_methods_user ON payment_methods (user_id);
