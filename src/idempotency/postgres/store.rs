//! The guard as an [`IdempotencyStore`] and its claims' [`Settle`]: each call is a
//! request queued to the batcher, which is spawned on first use.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::batcher::{run_batcher, ClaimReply, Request};
use super::{IdempotencyGuard, Shared};
use crate::idempotency::{
    Begin, BoxFuture, Claim, Error, IdempotencyMetrics, IdempotencyStore, Settle,
};

/// What the claims hold: the way to the batcher.
pub(super) struct GuardInner {
    pub(super) shared: Arc<Shared>,
    // Spawned on first use, so `new` needs no runtime. The batcher ends when the last
    // sender (this guard, its clones and their claims) is gone.
    pub(super) batcher: OnceLock<mpsc::Sender<Request>>,
}

impl fmt::Debug for GuardInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardInner").finish_non_exhaustive()
    }
}

impl GuardInner {
    pub(super) fn sender(&self) -> &mpsc::Sender<Request> {
        self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.shared.settings.queue_capacity);
            tokio::spawn(run_batcher(Arc::clone(&self.shared), rx));
            tx
        })
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for IdempotencyGuard {
    async fn begin(&self, key: &str) -> Result<Begin, Error> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Claim {
            key: key.to_owned(),
            reply,
        };
        self.sender()
            .send(request)
            .await
            .map_err(|_| Error::Closed)?;
        match answer.await.map_err(|_| Error::Closed)?? {
            ClaimReply::Claimed(token) => Ok(Begin::Run(Claim::new(
                key.to_owned(),
                token,
                Arc::clone(&self.inner) as Arc<dyn Settle>,
            ))),
            ClaimReply::Processed => {
                self.inner.shared.counters.duplicates.fetch_add(1, Relaxed);
                Ok(Begin::AlreadyProcessed)
            }
            ClaimReply::Busy => Ok(Begin::Busy),
        }
    }

    fn lease(&self) -> Duration {
        self.inner.shared.settings.lease
    }

    fn metrics(&self) -> IdempotencyMetrics {
        self.inner.shared.counters.snapshot()
    }
}

impl Settle for GuardInner {
    fn settle(&self, key: String, token: i64, done: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let request = Request::Settle {
                key,
                token,
                done,
                reply: Some(reply),
            };
            self.sender()
                .send(request)
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        })
    }

    fn abandon(&self, key: String, token: i64) {
        // Only if the batcher runs (a claim implies it does) and has room: `Drop` cannot
        // wait. Otherwise the lease frees the key.
        if let Some(tx) = self.batcher.get() {
            let _ = tx.try_send(Request::Settle {
                key,
                token,
                done: false,
                reply: None,
            });
        }
    }

    fn renew(&self, key: String, token: i64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.sender()
                .send(Request::Renew { key, token, reply })
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        })
    }

    fn lease(&self) -> Duration {
        self.shared.settings.lease
    }
}
