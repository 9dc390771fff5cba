//! Lease renewal of the PostgreSQL store's claims, batched as claims and settles are.

use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::statements::with_retries;
use super::Shared;
use crate::idempotency::Error;

// Only a claim whose lease still runs: a released claim (`-infinity`) is never revived
// by a renewal that was already queued, and one that ran out may be taken over.
const RENEW_SQL: &str = "\
UPDATE processed_events AS p
SET claimed_until = now() + make_interval(secs => $3)
FROM unnest($1::text[], $2::int8[]) AS u(event_id, token)
WHERE p.event_id = u.event_id AND p.claim_token = u.token
  AND p.state = 'claimed' AND p.claimed_until > now()
RETURNING p.event_id, p.claim_token";

/// A queued renewal: key, claim token, where the answer goes.
pub(super) type RenewRequest = (String, i64, oneshot::Sender<Result<bool, Error>>);

impl Shared {
    /// Extends the leases of live claims; then frees `permit` if given.
    pub(super) async fn renew_batch(
        &self,
        mut requests: Vec<RenewRequest>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        requests.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<&str> = requests.iter().map(|r| r.0.as_str()).collect();
        let tokens: Vec<i64> = requests.iter().map(|r| r.1).collect();
        let lease = self.settings.lease.as_secs_f64();
        let renewed = with_retries(|| {
            sqlx::query_as::<_, (String, i64)>(RENEW_SQL)
                .bind(&keys)
                .bind(&tokens)
                .bind(lease)
                .fetch_all(&self.pool)
        })
        .await;
        drop(permit);
        match renewed {
            Ok(mut renewed) => {
                renewed.sort_unstable();
                for (key, token, reply) in requests {
                    let ok = renewed.binary_search(&(key, token)).is_ok();
                    let _ = reply.send(Ok(ok));
                }
            }
            Err(e) => {
                tracing::warn!(keys = keys.len(), error = %e, "Idempotency renew batch failed.");
                let source = Arc::new(e);
                for (_, _, reply) in requests {
                    let _ = reply.send(Err(Error::Database {
                        op: "renew",
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }
}
