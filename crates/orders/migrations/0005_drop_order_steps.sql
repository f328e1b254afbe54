-- The timeline lives in orders.timeline since 0004; order_steps is no longer read or written.
DROP TABLE order_steps;
