//! The idempotency step: before an event's work runs, its key is claimed in the
//! store; a key already processed finishes without the handler or any post.

use std::sync::Arc;
use std::time::Duration;

use super::complete::{finish_now, Delivery, Mark};
use crate::idempotency::{Begin, IdempotencyStore, IDEMPOTENCY_KEY_HEADER};
use crate::metrics::Metrics;

/// Where an event's idempotency key comes from. In configuration:
/// `{"header": "name"}` or `"event_id"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IdempotencyKey {
    /// The value of this Kafka header (UTF-8), falling back to the CloudEvent
    /// `id` when the header is absent or not UTF-8. The default uses the guide's
    /// header, [`IDEMPOTENCY_KEY_HEADER`] (`idempotency_key`).
    Header(String),
    /// Always the CloudEvent `id`.
    EventId,
}

impl Default for IdempotencyKey {
    fn default() -> Self {
        IdempotencyKey::Header(IDEMPOTENCY_KEY_HEADER.to_owned())
    }
}

impl IdempotencyKey {
    /// The key of an event with these headers and this id.
    pub(crate) fn of<'a>(&self, headers: &[(&str, &'a [u8])], id: &'a str) -> &'a str {
        match self {
            IdempotencyKey::Header(name) => headers
                .iter()
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
                .unwrap_or(id),
            IdempotencyKey::EventId => id,
        }
    }
}

/// Why an event's work does not run: [`Guard::admit`]'s error.
pub(crate) enum Skip {
    /// Processed before: finish it without running anything.
    Duplicate,
    /// The store is gone for good: hold the offset (a restart replays it).
    Hold,
    /// The partition was revoked while the event waited: drop it unhandled (the
    /// new owner has it).
    Stale,
    /// The key is busy and the caller may not wait (a batch run holding
    /// claims of its own: see the flow's `run_batch`).
    Busy,
}

impl Skip {
    /// Settles the event's offset accordingly.
    pub(crate) fn apply<D: Delivery>(self, d: D, metrics: &Metrics) {
        match self {
            Skip::Duplicate => finish_now(d, metrics),
            Skip::Hold => d.hold(),
            Skip::Stale => {
                Metrics::add(&metrics.stale_dropped, 1);
                drop(d);
            }
            // Dropped unfinished, it is held; the flow takes it up instead.
            Skip::Busy => drop(d),
        }
    }
}

/// The pipeline's idempotency store and key choice.
pub(crate) struct Guard {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) key: IdempotencyKey,
    /// Drives the store's futures and settles claims, also for sync workers.
    pub(crate) runtime: tokio::runtime::Handle,
    /// The flows run elsewhere (sync workers, each on a runtime of its own):
    /// the store's calls go to `runtime`, where its tasks (the PostgreSQL
    /// batcher) are spawned and driven, never to a worker that may block.
    pub(crate) remote: bool,
}

/// First pause before asking again about a busy key or after a store error
/// (doubling up to [`MAX_PAUSE`]): a few handler runs.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause: a store back from an outage is noticed within a second.
const MAX_PAUSE: Duration = Duration::from_secs(1);

impl Guard {
    /// Claims `key` for this event, waiting while another worker holds it or
    /// the store is unreachable: nothing can be decided then, so only this
    /// event's lane waits (other lanes go on), until the store answers or the
    /// partition is revoked (which cancels an async wait, and ends a sync worker's
    /// with [`Skip::Stale`]).
    ///
    /// The claim it returns renews its lease until it is settled (`Claim::keep_alive`):
    /// it is settled only once both lifecycle posts are acknowledged, however long a
    /// slow XZepr takes, and a duplicate of the key must find it busy meanwhile, not
    /// expired. Marking the key done when the handler returns instead would let a
    /// crash before the posts land skip the replayed event's posts for good.
    ///
    /// Without `wait`, a busy key is [`Skip::Busy`] at once.
    pub(crate) async fn admit<D: Delivery>(
        &self,
        key: &str,
        d: &D,
        metrics: &Metrics,
        wait: bool,
    ) -> Result<Mark, Skip> {
        let mut pause = FIRST_PAUSE;
        let mut logged = false;
        loop {
            match self.begin(key).await {
                Ok(Begin::Run(mut claim)) => {
                    claim.keep_alive(&self.runtime);
                    return Ok(Mark {
                        claim,
                        runtime: self.runtime.clone(),
                    });
                }
                Ok(Begin::AlreadyProcessed) => {
                    Metrics::add(&metrics.duplicates, 1);
                    return Err(Skip::Duplicate);
                }
                Ok(Begin::Busy) if !wait => return Err(Skip::Busy),
                Ok(Begin::Busy) => {}
                Err(e) if e.is_retryable() => {
                    Metrics::add(&metrics.idempotency_errors, 1);
                    if !logged {
                        logged = true;
                        tracing::warn!(
                            topic = d.topic(),
                            partition = d.partition(),
                            offset = d.offset(),
                            key,
                            error = %e,
                            "Idempotency store failed; retrying, the event waits."
                        );
                    }
                }
                Err(e) => {
                    Metrics::add(&metrics.idempotency_errors, 1);
                    tracing::error!(
                        topic = d.topic(),
                        partition = d.partition(),
                        offset = d.offset(),
                        key,
                        error = %e,
                        "Idempotency store closed; offset held."
                    );
                    return Err(Skip::Hold);
                }
            }
            // Asked before each pause: a sync worker's wait is not cancelled by the
            // revocation, and a revoked partition's event must not wait for a key it
            // will never run.
            if !d.is_current() {
                return Err(Skip::Stale);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    async fn begin(&self, key: &str) -> Result<Begin, crate::idempotency::Error> {
        if !self.remote {
            return self.store.begin(key).await;
        }
        let (store, key) = (Arc::clone(&self.store), key.to_owned());
        match self
            .runtime
            .spawn(async move { store.begin(&key).await })
            .await
        {
            Ok(begun) => begun,
            // The store's runtime is shutting down.
            Err(_) => Err(crate::idempotency::Error::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::MemoryStore;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Mutex;

    /// A delivery whose partition can be revoked; records how it was settled.
    struct Revocable {
        current: Arc<AtomicBool>,
        settled: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Delivery for Revocable {
        fn topic(&self) -> &str {
            "t"
        }
        fn topic_arc(&self) -> Arc<str> {
            Arc::from("t")
        }
        fn partition(&self) -> i32 {
            0
        }
        fn offset(&self) -> i64 {
            7
        }
        fn payload(&self) -> Option<&[u8]> {
            None
        }
        fn headers(&self) -> Vec<(&str, &[u8])> {
            Vec::new()
        }
        fn is_current(&self) -> bool {
            self.current.load(Relaxed)
        }
        fn finish(self) {
            self.settled.lock().unwrap().push("finished");
        }
        fn hold(self) {
            self.settled.lock().unwrap().push("held");
        }
    }

    #[test]
    fn a_sync_wait_on_a_busy_key_ends_when_the_partition_is_revoked() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // A lease no test outlives: only the revocation can end the wait.
        let store = MemoryStore::builder()
            .lease(Duration::from_secs(3600))
            .retention(Duration::from_secs(7200))
            .build()
            .unwrap();
        let held = match rt.block_on(store.begin("k")).unwrap() {
            Begin::Run(claim) => claim,
            other => panic!("{other:?}"),
        };
        let guard = Arc::new(Guard {
            store: Arc::new(store),
            key: IdempotencyKey::default(),
            runtime: rt.handle().clone(),
            remote: true,
        });
        let metrics = Arc::new(Metrics::default());
        let current = Arc::new(AtomicBool::new(true));
        let settled = Arc::default();
        let d = Revocable {
            current: Arc::clone(&current),
            settled: Arc::clone(&settled),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (g, m) = (Arc::clone(&guard), Arc::clone(&metrics));
        // A sync worker thread, on a runtime of its own, waiting on the busy key.
        std::thread::spawn(move || {
            let own = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let admitted = own.block_on(g.admit("k", &d, &m, true));
            let stale = matches!(admitted, Err(Skip::Stale));
            if let Err(skip) = admitted {
                skip.apply(d, &m);
            }
            let _ = tx.send(stale);
        });
        current.store(false, Relaxed);
        let stale = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the wait went on after the revocation");
        assert!(stale, "not dropped as stale");
        assert_eq!(metrics.snapshot().stale_dropped, 1);
        // Dropped unhandled: neither finished nor held by this path.
        assert!(settled.lock().unwrap().is_empty());
        drop(held);
    }

    #[test]
    fn the_key_is_the_header_else_the_event_id() {
        let default = IdempotencyKey::default();
        let h: [(&str, &[u8]); 2] = [("other", b"x"), ("idempotency_key", b"order-7")];
        assert_eq!(default.of(&h, "ev-1"), "order-7");
        assert_eq!(default.of(&h[..1], "ev-1"), "ev-1");
        // Empty or not UTF-8: not a key.
        assert_eq!(default.of(&[("idempotency_key", b"")], "ev-1"), "ev-1");
        assert_eq!(default.of(&[("idempotency_key", b"\xff")], "ev-1"), "ev-1");
        assert_eq!(IdempotencyKey::EventId.of(&h, "ev-1"), "ev-1");
        let custom = IdempotencyKey::Header("dedup".to_owned());
        assert_eq!(custom.of(&[("dedup", b"k")], "ev-1"), "k");
        assert_eq!(custom.of(&h, "ev-1"), "ev-1");
    }
}
