-- The W3C trace context the order was placed under: its saga's messages carry it.
ALTER TABLE orders ADD COLUMN traceparent TEXT;
