//! Receiver discovery: find the receiver by exact name and type across every
//! page, or create it, converging with other instances that race to create it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{ClientError, EventReceiver, ReceiverQuery, XzeprClient};

/// One (name, type)'s discovery. Slots are never removed from the map (there is
/// one per (name, type) this process ever discovered: a handful), so every
/// caller for a (name, type) always meets the same `lock`: one discovery in
/// flight per (name, type), whatever `forget_receiver` does meanwhile.
#[derive(Default)]
pub(super) struct DiscoverySlot {
    /// Held for the whole of a discovery.
    lock: tokio::sync::Mutex<()>,
    /// The id found, if still trusted. A std mutex, never held across an await:
    /// `forget_receiver` (sync) clears it without waiting for a discovery.
    cached: Mutex<Option<String>>,
}

pub(super) type Singleflight = Mutex<HashMap<(String, String), Arc<DiscoverySlot>>>;

/// What a receiver was discovered with, to discover it again after a 404.
#[derive(Debug, Clone)]
pub(super) struct ReceiverSpec {
    name: String,
    receiver_type: String,
    version: String,
    description: String,
    schema: Value,
}

/// Least wait after creating a receiver before the list that names the winner
/// (see `discover_or_create_event_receiver`).
const DISCOVERY_SETTLE_MIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Most wait after creating a receiver: a start-up cost paid once per
/// (name, type) and process.
const DISCOVERY_SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl XzeprClient {
    /// Finds the receiver with exactly this name **and** type across every page
    /// (the server's filters cannot be trusted), or creates it, and returns its
    /// id. Concurrent callers in this process share one discovery per (name,
    /// type), always.
    ///
    /// XZepr's create is check-then-insert, so instances starting at once can
    /// each create one. After creating (or being told it exists), the client
    /// waits twice the create's latency (20 ms to 2 s) for concurrent creators'
    /// inserts to land, then lists again. Every instance converges on the same receiver all the
    /// same: after creating, it lists again, and whenever several exact matches
    /// exist it takes the **earliest `created_at`, then the smallest id**. The
    /// losers are left alone (the API cannot tell which one another instance is
    /// using) and logged once each at `warn` with their ids. A 400 "already
    /// exists" on create means another instance won the race: list again and
    /// take the winner.
    ///
    /// # Errors
    /// Any [`ClientError`] of the list or create calls.
    pub async fn discover_or_create_event_receiver(
        &self,
        name: &str,
        receiver_type: &str,
        version: &str,
        description: &str,
        schema: Value,
    ) -> Result<String, ClientError> {
        let spec = ReceiverSpec {
            name: name.to_owned(),
            receiver_type: receiver_type.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
            schema,
        };
        self.discover(spec, None, &|_| {}).await
    }

    /// The one discovery of `spec`'s (name, type) at a time. With `stale`, a
    /// cached id equal to it is not trusted (it came back 404). `on_created`
    /// gets the id of a receiver this call created, as soon as the create
    /// answers (before the wait and list that name the winner).
    async fn discover(
        &self,
        spec: ReceiverSpec,
        stale: Option<&str>,
        on_created: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, ClientError> {
        let slot = self.discovery_slot(&spec.name, &spec.receiver_type);
        let _discovering = slot.lock.lock().await;
        {
            let cached = slot.cached.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(id) = cached.as_deref().filter(|id| Some(*id) != stale) {
                return Ok(id.to_owned());
            }
        }
        let (name, ty) = (spec.name.as_str(), spec.receiver_type.as_str());
        let id = match self.find_receiver(name, ty).await? {
            Some(id) => id,
            None => {
                let sent = std::time::Instant::now();
                let created = self
                    .create_event_receiver(
                        name,
                        ty,
                        &spec.version,
                        &spec.description,
                        spec.schema.clone(),
                    )
                    .await;
                // XZepr's create is check-then-insert: another instance that
                // passed its check before our insert may not have inserted yet
                // (and may carry the earlier `created_at`). Its insert comes at
                // most about one create's latency after ours, so wait that out
                // (twice, bounded) and let the list, not our create, name the
                // winner: every instance then reads the same list.
                let settle = (sent.elapsed() * 2).clamp(DISCOVERY_SETTLE_MIN, DISCOVERY_SETTLE_MAX);
                match created {
                    Ok(ours) => {
                        on_created(&ours);
                        tokio::time::sleep(settle).await;
                        self.find_receiver(name, ty).await?.unwrap_or(ours)
                    }
                    Err(ClientError::Api(e))
                        if e.status == 400 && e.body.contains("already exists") =>
                    {
                        tokio::time::sleep(settle).await;
                        self.find_receiver(name, ty)
                            .await?
                            .ok_or(ClientError::Api(e))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        *slot.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        self.inner
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(spec));
        Ok(id)
    }

    fn discovery_slot(&self, name: &str, receiver_type: &str) -> Arc<DiscoverySlot> {
        let mut map = self
            .inner
            .discovering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry((name.to_owned(), receiver_type.to_owned()))
                .or_default(),
        )
    }

    /// After `stale_id` came back 404 (XZepr keeps receivers in memory, so a
    /// restart loses them): discovers or creates the receiver again, with the
    /// name, type and the rest it was first discovered with, and returns its id.
    /// Concurrent callers share the one discovery of its (name, type): the first
    /// asks the server, the others get its answer. `Ok(None)` when `stale_id` was
    /// not discovered by this client.
    ///
    /// # Errors
    /// As [`XzeprClient::discover_or_create_event_receiver`].
    pub async fn rediscover_receiver(&self, stale_id: &str) -> Result<Option<String>, ClientError> {
        self.rediscover_receiver_with(stale_id, &|_| {}).await
    }

    /// [`XzeprClient::rediscover_receiver`], calling `on_created` with the id of
    /// a receiver it creates the moment the create answers: XZepr publishes
    /// that receiver's `receiver.created` before it answers, so whoever must
    /// recognise its own receivers learns the id before that event can arrive.
    pub(crate) async fn rediscover_receiver_with(
        &self,
        stale_id: &str,
        on_created: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Option<String>, ClientError> {
        let spec = self
            .inner
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stale_id)
            .cloned();
        let Some(spec) = spec else {
            return Ok(None);
        };
        self.discover(spec.as_ref().clone(), Some(stale_id), on_created)
            .await
            .map(Some)
    }

    /// Forgets a discovered receiver id (e.g. after it came back 404 because the
    /// server restarted), so the next discovery asks the server again. A
    /// discovery already in flight for this (name, type) is not disturbed, and
    /// later callers still wait for it: never two at once.
    pub fn forget_receiver(&self, name: &str, receiver_type: &str) {
        let slot = self
            .inner
            .discovering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(name.to_owned(), receiver_type.to_owned()))
            .cloned();
        if let Some(slot) = slot {
            *slot.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The id of the receiver named `name` of type `receiver_type`, across every
    /// page: among several exact matches, the deterministic winner (earliest
    /// `created_at`, then smallest id); the others are logged once each.
    async fn find_receiver(
        &self,
        name: &str,
        receiver_type: &str,
    ) -> Result<Option<String>, ClientError> {
        const PAGE: u32 = 1000;
        let mut seen = std::collections::HashSet::new();
        let mut matches = Vec::new();
        let mut offset = 0u64;
        loop {
            let page = self
                .list_event_receivers(
                    &ReceiverQuery::new()
                        .with_name(name)
                        .with_type(receiver_type)
                        .with_limit(PAGE)
                        .with_offset(offset),
                )
                .await?;
            let mut new = 0;
            for r in page.data.iter() {
                if seen.insert(r.id.clone()) {
                    new += 1;
                    if r.name == name && r.receiver_type == receiver_type {
                        matches.push(r.clone());
                    }
                }
            }
            let more = page.pagination.is_some_and(|p| p.has_more);
            // A server that ignores `offset` returns the same page again: stop.
            if !more || new == 0 {
                break;
            }
            offset += page.data.len() as u64;
        }
        let Some(winner) = pick_winner(&matches) else {
            return Ok(None);
        };
        let winner = winner.id.clone();
        if matches.len() > 1 {
            let mut warned = self
                .inner
                .warned_losers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let losers: Vec<&str> = matches
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| *id != winner && warned.insert((*id).to_owned()))
                .collect();
            if !losers.is_empty() {
                tracing::warn!(
                    name, receiver_type, receiver = %winner, losers = ?losers,
                    "Several receivers with this name and type (created concurrently): \
                     using the earliest; the others are left alone."
                );
            }
        }
        Ok(Some(winner))
    }
}

/// The receiver every instance agrees on among exact matches: the earliest
/// `created_at`, then the smallest id. A `created_at` that does not parse sorts
/// after every one that does (then by id), so the rule stays total.
pub(super) fn pick_winner(matches: &[EventReceiver]) -> Option<&EventReceiver> {
    matches.iter().min_by(|a, b| {
        let at = |r: &EventReceiver| chrono::DateTime::parse_from_rfc3339(&r.created_at).ok();
        match (at(a), at(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then_with(|| a.id.cmp(&b.id))
    })
}
