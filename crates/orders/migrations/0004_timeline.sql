-- The saga's timeline moves onto the order row (JSON lines appended by the same UPDATE that
-- changes the saga's state: no extra statement per step). order_steps is no longer written.
ALTER TABLE orders ADD COLUMN timeline TEXT NOT NULL DEFAULT '';
