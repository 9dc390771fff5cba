//! [`TxClaim`]: a claim with an open transaction, whose commit writes the processed
//! mark with the handler's writes.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use sqlx::{PgConnection, Postgres, Transaction};

#[cfg(doc)]
use super::IdempotencyGuard;
use super::Shared;
#[cfg(doc)]
use crate::idempotency::Begin;
use crate::idempotency::{Claim, Error};

const MARK_IN_TX_SQL: &str = "\
UPDATE processed_events
SET state = 'processed', claimed_until = NULL
WHERE event_id = $1 AND claim_token = $2 AND state = 'claimed'";

/// A claim with an open transaction, from [`IdempotencyGuard::begin_in_tx`]. Write
/// through [`connection`](TxClaim::connection), then [`commit`](TxClaim::commit)
/// (writes + processed mark) or [`rollback`](TxClaim::rollback) (nothing, key
/// released). Dropped, it rolls back and releases the key.
#[must_use = "a transactional claim must be committed or rolled back"]
pub struct TxClaim {
    pub(super) claim: Claim,
    pub(super) tx: Transaction<'static, Postgres>,
    pub(super) shared: Arc<Shared>,
}

/// The answer of [`IdempotencyGuard::begin_in_tx`]; as [`Begin`], with a transaction.
#[derive(Debug)]
#[non_exhaustive]
pub enum TxBegin {
    /// The caller holds the key and a transaction.
    Run(TxClaim),
    /// Processed before: skip the work.
    AlreadyProcessed,
    /// Another worker holds the key: ask again later.
    Busy,
}

impl TxClaim {
    /// The idempotency key.
    pub fn key(&self) -> &str {
        self.claim.key()
    }

    /// The open transaction's connection, for the handler's statements
    /// (`.execute(&mut *conn)`).
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The open transaction itself (savepoints: `begin()` on it).
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }

    /// Writes the processed mark in the transaction and commits it: the handler's
    /// writes and the mark land together.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when the lease ran out and another worker took the key over
    /// (the transaction is rolled back: nothing of this run lands); [`Error::Database`]
    /// (`op = "mark"` or `"commit"`): rolled back, the key released.
    pub async fn commit(self) -> Result<(), Error> {
        let TxClaim {
            claim,
            mut tx,
            shared,
        } = self;
        let marked = sqlx::query(MARK_IN_TX_SQL)
            .bind(claim.key())
            .bind(claim.token())
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::database("mark", e))?
            .rows_affected();
        if marked == 0 {
            let key = claim.key().to_owned();
            // Not ours any more: nothing to release; `tx` rolls back on drop.
            claim.disarm();
            return Err(Error::LeaseLost { key });
        }
        // On a commit error `claim` drops and is released; if the commit did land, the
        // release finds the key processed and changes nothing.
        tx.commit()
            .await
            .map_err(|e| Error::database("commit", e))?;
        claim.disarm();
        shared.counters.processed.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Rolls the transaction back and releases the key so a retry runs it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] with `op = "rollback"` (the key is still released), or the
    /// release's error.
    pub async fn rollback(self) -> Result<(), Error> {
        let TxClaim { claim, tx, .. } = self;
        let rolled_back = tx
            .rollback()
            .await
            .map_err(|e| Error::database("rollback", e));
        claim.release().await?;
        rolled_back
    }
}

impl fmt::Debug for TxClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxClaim")
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}
