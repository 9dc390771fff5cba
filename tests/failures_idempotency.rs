//! Idempotency under a slow XZepr, on librdkafka's mock cluster with the in-memory
//! store: a claim is settled only once both lifecycle posts are acknowledged, so it
//! must outlive its lease while XZepr takes its time, and a duplicate of the key
//! arriving meanwhile must not run the work again. (The PostgreSQL variant is in
//! `idempotency_pg.rs`.)
#![cfg(feature = "dev-stack")]

mod kafka_support;
mod slow_xzepr;

use std::time::Duration;

use xzepr_consumer::idempotency::MemoryStore;

#[test]
fn a_duplicate_after_the_lease_is_not_run_again_while_xzepr_is_slow() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = kafka_support::cluster("slow-xzepr", 1);
    let brokers = cluster.bootstrap_servers();
    let lease = Duration::from_millis(300);
    let store = MemoryStore::builder().lease(lease).build().unwrap();
    slow_xzepr::duplicate_after_the_lease_is_not_run_again(
        &rt,
        &brokers,
        "slow-xzepr",
        store,
        lease,
    );
}
