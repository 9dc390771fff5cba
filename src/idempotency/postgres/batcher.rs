//! The batcher task: queued [`Request`]s turned into statements, at most
//! `max_in_flight_batches` at once.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::statements::SettleRequest;
use super::Shared;
use crate::idempotency::Error;

pub(super) enum Request {
    Claim {
        key: String,
        reply: oneshot::Sender<Result<ClaimReply, Error>>,
    },
    Settle {
        key: String,
        token: i64,
        done: bool,
        // None: released from `Drop`, nobody waits.
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Renew {
        key: String,
        token: i64,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum ClaimReply {
    Claimed(i64),
    Processed,
    Busy,
}

/// The batcher: turns queued requests into statements, at most
/// `max_in_flight_batches` at once. Ends when every sender is gone.
pub(super) async fn run_batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>) {
    let max = shared.settings.max_batch_size;
    let in_flight = shared.settings.max_in_flight_batches;
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut buf = Vec::with_capacity(max);
    loop {
        // Waiting for a free statement slot first: meanwhile requests pile up in the
        // channel and leave together.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        if rx.recv_many(&mut buf, max).await == 0 {
            break;
        }
        // Linger only if another statement is running (our answers would not come
        // sooner than its anyway); an idle guard sends a lone request at once.
        let others_running = permits.available_permits() + 1 < in_flight;
        if others_running && buf.len() < max && !shared.settings.batch_delay.is_zero() {
            let deadline = tokio::time::Instant::now() + shared.settings.batch_delay;
            while buf.len() < max {
                let room = max - buf.len();
                tokio::select! {
                    n = rx.recv_many(&mut buf, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(max));
        tokio::spawn(execute(Arc::clone(&shared), batch, permit));
    }
}

/// One batch: renewals first (a release in the same batch then wins), settles next
/// (so a waiter polling the same key sees it processed), then claims; one statement
/// each.
async fn execute(shared: Arc<Shared>, batch: Vec<Request>, permit: OwnedSemaphorePermit) {
    let mut claims = Vec::new();
    let mut settles = Vec::new();
    let mut renewals = Vec::new();
    for request in batch {
        match request {
            Request::Renew { key, token, reply } => renewals.push((key, token, reply)),
            Request::Claim { key, reply } => claims.push((key, reply)),
            Request::Settle {
                key,
                token,
                done,
                reply,
            } => settles.push(SettleRequest {
                key,
                token,
                done,
                reply,
            }),
        }
    }
    shared.counters.statements.fetch_add(
        u64::from(!claims.is_empty())
            + u64::from(!settles.is_empty())
            + u64::from(!renewals.is_empty()),
        Relaxed,
    );
    // The slot is held until the batch's last statement returns.
    let mut permit = Some(permit);
    if !renewals.is_empty() {
        let last = (claims.is_empty() && settles.is_empty())
            .then(|| permit.take())
            .flatten();
        shared.renew_batch(renewals, last).await;
    }
    if !settles.is_empty() {
        let last = claims.is_empty().then(|| permit.take()).flatten();
        shared.settle_batch(settles, last).await;
    }
    if !claims.is_empty() {
        shared.claim_batch(claims, permit).await;
    }
}
