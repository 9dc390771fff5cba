//! Placeholder: the idempotency bench lands with the PostgreSQL harness.
fn main() {}
