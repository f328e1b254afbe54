-- What other services may read of the user center's data when they share its database
-- (the shared data pattern, "the same database"): a published view, never the tables.
-- Read through a read-only connection (SQLite) or the read-only role that the users
-- service grants SELECT on this view alone (PostgreSQL).
CREATE VIEW user_directory AS
    SELECT id, email, name, role, status, addresses, version, updated_at FROM users;
