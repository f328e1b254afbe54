//! End-to-end tests live in `tests/`. They start the whole shop through
//! `shopmesh-test-support` and talk to it over loopback sockets; set
//! `SHOPMESH_TEST_DATABASE=postgres://…` to run them on PostgreSQL.
