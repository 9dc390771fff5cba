-- The idempotency guard's table (xzepr-consumer, `idempotency` module, feature
-- `postgres`). One row per idempotency key. Idempotent: safe to run again, and
-- `IdempotencyGuard::migrate` runs it under an advisory lock. Services that manage
-- their schema with `sqlx migrate` can copy this file into their own migrations.
--
-- States (see the module docs):
--   claimed   one worker runs the key's work until `claimed_until` (its lease);
--             a released claim has `claimed_until = '-infinity'` (claimable at once)
--   processed the work is done; `claimed_until` is NULL
CREATE TABLE IF NOT EXISTS processed_events (
    event_id      TEXT        PRIMARY KEY,
    state         TEXT        NOT NULL CHECK (state IN ('claimed', 'processed')),
    -- Which claim holds the row: a stale worker's complete/release matches nothing.
    claim_token   BIGINT      NOT NULL,
    claimed_until TIMESTAMPTZ,
    -- The retention column: when the key was last claimed, which is when its work
    -- started (a lease, seconds, before it was processed). Settling does not touch it,
    -- so that update changes no indexed column. Cleanup deletes rows older than the
    -- retention.
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT processed_events_lease_iff_claimed
        CHECK ((state = 'claimed') = (claimed_until IS NOT NULL))
)
-- Room on each page for the claimed -> processed update to stay there (a HOT update:
-- no index writes, no new page).
WITH (fillfactor = 80);

-- Retention cleanup walks this index, oldest first, in bounded chunks.
CREATE INDEX IF NOT EXISTS processed_events_processed_at_idx
    ON processed_events (processed_at);
