//! A throwaway PostgreSQL server for the idempotency tests and bench: the dev
//! stack's [`LocalPostgres`], skipped with a reason when the machine has no
//! server binaries, except in CI.
//!
//! Without them, [`PgServer::start`] prints `SKIPPED: <reason>` and returns
//! `None`; with `CI` set it panics instead (`.ci/deps` installs them, so CI must
//! run these tests).
#![allow(dead_code)]

use sqlx::postgres::{PgPool, PgPoolOptions};
use xzepr_consumer::devstack::postgres::LocalPostgres;
// Each test or bench crate that includes this module uses one of them.
#[allow(unused_imports)]
pub use xzepr_consumer::devstack::postgres::{DURABLE, FAST};

/// A running server; stopped on drop.
pub struct PgServer(LocalPostgres);

impl PgServer {
    /// Starts a fresh server with `settings` (`name=value`), or explains why it cannot.
    pub fn start(test: &str, settings: &[&str]) -> Option<PgServer> {
        match LocalPostgres::start(settings) {
            Ok(server) => Some(PgServer(server)),
            Err(reason) => {
                let reason = xzepr_consumer::ErrorChain(&reason);
                if std::env::var_os("CI").is_some() {
                    panic!("{test}: PostgreSQL is required in CI: {reason}");
                }
                println!("SKIPPED: {test}: {reason}");
                None
            }
        }
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        self.0.url(db)
    }

    /// A pool on a fresh database with the guard's table migrated.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url("postgres"))
            .await
            .expect("connect to the test server");
        sqlx::query("CREATE DATABASE test")
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url("test"))
            .await
            .expect("connect to the test database");
        xzepr_consumer::idempotency::IdempotencyGuard::migrate(&pool)
            .await
            .expect("migrate");
        pool
    }
}
