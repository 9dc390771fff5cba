//! The claim, settle and cleanup statements, run as batches, and the retry of a
//! statement that lost a deadlock or serialization race.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::batcher::ClaimReply;
use super::Shared;
use crate::idempotency::Error;

/// Retries of a statement that lost a deadlock or serialization race. Each statement
/// is atomic, so a retry is safe; sorted keys make this rare.
const TRANSIENT_RETRIES: u32 = 3;

const CLAIM_SQL: &str = "\
WITH claimed AS (
    INSERT INTO processed_events AS p (event_id, state, claim_token, claimed_until, processed_at)
    SELECT k, 'claimed', $2, now() + make_interval(secs => $3), now()
    FROM unnest($1::text[]) AS k
    ON CONFLICT (event_id) DO UPDATE
        SET state = 'claimed',
            claim_token = EXCLUDED.claim_token,
            claimed_until = EXCLUDED.claimed_until,
            processed_at = EXCLUDED.processed_at
        WHERE p.state = 'claimed' AND p.claimed_until <= now()
    RETURNING p.event_id, (p.xmax = 0) AS inserted
)
SELECT k.k,
       c.event_id IS NOT NULL,
       COALESCE(c.inserted, false),
       COALESCE(e.state = 'processed', false)
FROM unnest($1::text[]) AS k(k)
LEFT JOIN claimed c ON c.event_id = k.k
LEFT JOIN processed_events e ON e.event_id = k.k";
// The outer SELECT sees the table as of the statement's start: a key neither claimed
// nor processed there is held by another claim (possibly one committed meanwhile),
// which is `Busy`: safe, since the caller asks again.

// Settling leaves `processed_at` (the claim time) alone: no indexed column changes, so
// the update can stay on its page (HOT) and skip both index writes.
const SETTLE_SQL: &str = "\
UPDATE processed_events AS p
SET state = CASE WHEN u.done THEN 'processed' ELSE 'claimed' END,
    claimed_until = CASE WHEN u.done THEN NULL ELSE '-infinity'::timestamptz END
FROM unnest($1::text[], $2::int8[], $3::bool[]) AS u(event_id, token, done)
WHERE p.event_id = u.event_id AND p.claim_token = u.token AND p.state = 'claimed'
RETURNING p.event_id";

// SKIP LOCKED: rows a claim is touching, or another guard's cleanup, are left for later.
const CLEANUP_SQL: &str = "\
DELETE FROM processed_events WHERE event_id IN (
    SELECT event_id FROM processed_events
    WHERE processed_at < now() - make_interval(secs => $1)
      AND (state = 'processed' OR claimed_until < now())
    LIMIT $2
    FOR UPDATE SKIP LOCKED)";

impl Shared {
    pub(super) async fn cleanup(&self) -> Result<u64, Error> {
        let chunk = self.settings.cleanup_chunk_size;
        let retention = self.settings.retention.as_secs_f64();
        let mut deleted = 0u64;
        loop {
            let n = sqlx::query(CLEANUP_SQL)
                .bind(retention)
                .bind(i64::from(chunk))
                .execute(&self.pool)
                .await
                .map_err(|e| Error::database("cleanup", e))?
                .rows_affected();
            deleted += n;
            self.counters.table_size.fetch_sub(n as i64, Relaxed);
            if n < u64::from(chunk) {
                break;
            }
        }
        let rows = self.refresh_table_size().await?;
        tracing::debug!(
            deleted,
            rows,
            "Deleted processed events past the retention."
        );
        Ok(deleted)
    }

    pub(super) async fn refresh_table_size(&self) -> Result<u64, Error> {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM processed_events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::database("count", e))?;
        self.counters.table_size.store(rows, Relaxed);
        Ok(rows.max(0) as u64)
    }

    /// Claims, then frees the statement slot `permit` (before answering: a caller's
    /// next request must find the guard idle, not linger behind this batch).
    pub(super) async fn claim_batch(
        &self,
        requests: Vec<(String, oneshot::Sender<Result<ClaimReply, Error>>)>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        // Sorted (row-lock order) and deduplicated: one statement may not touch a row
        // twice. Callers asking for the same key share one answer; only the first gets
        // the claim, the others hear `Busy`.
        let mut by_key: BTreeMap<String, Vec<oneshot::Sender<Result<ClaimReply, Error>>>> =
            BTreeMap::new();
        for (key, reply) in requests {
            by_key.entry(key).or_default().push(reply);
        }
        let keys: Vec<String> = by_key.keys().cloned().collect();
        let token: i64 = rand::random();
        let lease = self.settings.lease.as_secs_f64();
        let rows = with_retries(|| {
            sqlx::query_as::<_, (String, bool, bool, bool)>(CLAIM_SQL)
                .bind(&keys)
                .bind(token)
                .bind(lease)
                .fetch_all(&self.pool)
        })
        .await;
        drop(permit);
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(keys = keys.len(), error = %e, "Idempotency claim batch failed.");
                let source = Arc::new(e);
                for reply in by_key.into_values().flatten() {
                    let _ = reply.send(Err(Error::Database {
                        op: "claim",
                        source: Arc::clone(&source),
                    }));
                }
                return;
            }
        };
        let (mut claimed, mut inserted_rows, mut processed) = (0usize, 0i64, 0usize);
        for (key, won, inserted, was_processed) in rows {
            let Some(replies) = by_key.remove(&key) else {
                continue;
            };
            let answer = if won {
                claimed += 1;
                inserted_rows += i64::from(inserted);
                ClaimReply::Claimed(token)
            } else if was_processed {
                processed += 1;
                ClaimReply::Processed
            } else {
                ClaimReply::Busy
            };
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Ok(answer));
            }
            let rest = match answer {
                ClaimReply::Claimed(_) => ClaimReply::Busy,
                other => other,
            };
            for reply in replies {
                let _ = reply.send(Ok(rest));
            }
        }
        // Every key comes back from the statement; if one did not, `Busy` is the
        // answer that decides nothing.
        for reply in by_key.into_values().flatten() {
            let _ = reply.send(Ok(ClaimReply::Busy));
        }
        self.counters.table_size.fetch_add(inserted_rows, Relaxed);
        tracing::trace!(
            keys = keys.len(),
            claimed,
            processed,
            "Idempotency claim batch."
        );
    }

    /// Settles, then frees `permit` if given (as in `claim_batch`).
    pub(super) async fn settle_batch(
        &self,
        mut requests: Vec<SettleRequest>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        requests.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
        let tokens: Vec<i64> = requests.iter().map(|r| r.token).collect();
        let dones: Vec<bool> = requests.iter().map(|r| r.done).collect();
        let settled = with_retries(|| {
            sqlx::query_scalar::<_, String>(SETTLE_SQL)
                .bind(&keys)
                .bind(&tokens)
                .bind(&dones)
                .fetch_all(&self.pool)
        })
        .await;
        drop(permit);
        let settled = match settled {
            Ok(settled) => settled,
            Err(e) => {
                tracing::warn!(keys = keys.len(), error = %e, "Idempotency settle batch failed.");
                let source = Arc::new(e);
                for r in requests {
                    if let Some(reply) = r.reply {
                        let _ = reply.send(Err(Error::Database {
                            op: "settle",
                            source: Arc::clone(&source),
                        }));
                    }
                }
                return;
            }
        };
        // `settled` comes back in no particular order; keys are unique per request
        // (one claim per key at a time), so a sorted search finds each.
        let mut settled = settled;
        settled.sort_unstable();
        let (mut done, mut released) = (0u64, 0u64);
        for r in requests {
            let ok = settled.binary_search(&r.key).is_ok();
            if ok && r.done {
                done += 1;
            } else if ok {
                released += 1;
            }
            if let Some(reply) = r.reply {
                let _ = reply.send(if ok {
                    Ok(())
                } else {
                    Err(Error::LeaseLost { key: r.key })
                });
            }
        }
        self.counters.processed.fetch_add(done, Relaxed);
        self.counters.failed.fetch_add(released, Relaxed);
    }
}

pub(super) struct SettleRequest {
    pub(super) key: String,
    pub(super) token: i64,
    pub(super) done: bool,
    pub(super) reply: Option<oneshot::Sender<Result<(), Error>>>,
}

/// Runs `statement` again when it lost a deadlock or serialization race.
pub(super) async fn with_retries<T, Fut>(
    mut statement: impl FnMut() -> Fut,
) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match statement().await {
            Err(sqlx::Error::Database(e))
                if tries < TRANSIENT_RETRIES
                    && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tries += 1;
                tracing::debug!(tries, code = ?e.code(), "Retrying an idempotency statement.");
            }
            other => return other,
        }
    }
}
