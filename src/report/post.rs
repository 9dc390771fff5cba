//! The posting tasks: admit a record, encode it into a reused buffer, post it
//! with retries, the breaker, the rate limit and receiver rediscovery.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::breaker::Answer;
use super::dedup::Admission;
use super::{Record, ReportError, ReporterConfig, Shared, Status};
use crate::client::{ClientError, LifecycleBody, Phase};
use crate::flow_control::Outcome;
use crate::ErrorChain;

/// One posting task: takes the next admitted record, posts it (and any terminal
/// records its `started` held back), until the queue is closed and empty.
pub(super) async fn poster(shared: Arc<Shared>) {
    // Reused for every body: after a post its `Bytes` are dropped and the next
    // `reserve` takes the allocation back.
    let mut buf = BytesMut::with_capacity(BODY_CAPACITY);
    loop {
        let record = {
            let mut queue = shared.queue.lock().await;
            loop {
                let Some(record) = queue.recv().await else {
                    return;
                };
                if let Some(record) = admit(&shared, record) {
                    break record;
                }
            }
        };
        let mut next = post_record(&shared, record, &mut buf).await;
        // Only a `started` releases records (its terminal ones, which release
        // nothing): a short list, posted by this task in order.
        while let Some(record) = next.pop() {
            next.extend(post_record(&shared, record, &mut buf).await);
        }
    }
}

/// Typical encoded lifecycle body is 400-600 bytes.
const BODY_CAPACITY: usize = 1024;

/// Coalesces and orders: returns the record if it should be posted now.
fn admit(shared: &Shared, record: Record) -> Option<Record> {
    let admission = shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(record);
    match admission {
        Admission::Post(record) => Some(record),
        Admission::Done(ack, result) => {
            shared.stats.coalesced.fetch_add(1, Relaxed);
            ack.send(result);
            None
        }
        Admission::Parked => None,
        Admission::WithoutStarted(ack) => {
            shared.stats.terminal_without_started.fetch_add(1, Relaxed);
            ack.send(Err(started_not_acknowledged()));
            None
        }
    }
}

/// Why a terminal record was not sent: XZepr must never get a `completed` or
/// `failed` without its `started`. Retryable: a replay submits both again.
fn started_not_acknowledged() -> ReportError {
    ReportError::Failed {
        attempts: 0,
        reason: "its `started` was not acknowledged".into(),
        retryable: true,
        source: None,
    }
}

/// Posts one record and acknowledges it (and the duplicates that waited on it);
/// returns the terminal records that waited for it to be posted next.
async fn post_record(shared: &Shared, mut record: Record, buf: &mut BytesMut) -> Vec<Record> {
    let status = record.status;
    // The post's span ends with the post, before the acknowledgements.
    let result = {
        let (span, trace) = crate::trace::Span::post(record.trace.as_deref(), status.as_str());
        let result = span
            .instrument(post_with_rediscovery(
                shared,
                &mut record,
                buf,
                trace.as_ref(),
            ))
            .await;
        if let Err(e) = &result {
            span.failed(&e.to_string());
        }
        result
    };
    let Record { work, ack, .. } = record;
    let key = (work.work_id, status);
    let mut to_ack = Vec::new();
    let mut to_post = Vec::new();
    {
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let followers = st.in_flight.remove(&key).unwrap_or_default();
        shared
            .stats
            .coalesced
            .fetch_add(followers.len() as u64, Relaxed);
        to_ack.extend(followers.into_iter().map(|a| (a, result.clone())));
        if let Ok(id) = &result {
            st.remember(&shared.config, key.clone(), id);
        }
        if status == Status::Started {
            st.started_ended(&shared.config, &key.0, result.is_ok());
            for waiting in st.waiting.remove(&key.0).unwrap_or_default() {
                // Never a terminal without its `started`: after a failed one it
                // fails unsent, its offset stays unfinished and a replay posts both.
                if result.is_err() {
                    shared.stats.terminal_without_started.fetch_add(1, Relaxed);
                    to_ack.push((waiting.ack, Err(started_not_acknowledged())));
                    continue;
                }
                match st.admit(waiting) {
                    Admission::Post(r) => to_post.push(r),
                    Admission::Done(a, r) => to_ack.push((a, r)),
                    Admission::WithoutStarted(a) => {
                        shared.stats.terminal_without_started.fetch_add(1, Relaxed);
                        to_ack.push((a, Err(started_not_acknowledged())));
                    }
                    Admission::Parked => {}
                }
            }
        }
    }
    // Callbacks run outside the lock: a slow one must not stall the other tasks.
    ack.send(result);
    for (a, r) in to_ack {
        a.send(r);
    }
    to_post
}

/// Posts the record; after a 404 for a receiver this client discovered, discovers
/// it again and posts once more under the new id.
async fn post_with_rediscovery(
    shared: &Shared,
    record: &mut Record,
    buf: &mut BytesMut,
    trace: Option<&crate::trace::TraceContext>,
) -> Result<String, ReportError> {
    if let Some(new) = moved_receiver(shared, &record.work.receiver_id) {
        record.work.receiver_id = new;
    }
    let body = encode(record, buf)?;
    match post(shared, body, &record.work.work_id, trace).await {
        Err(Posted::NotFound(e)) => {
            let stale = record.work.receiver_id.clone();
            let own = shared.own.contains(&stale);
            // XZepr publishes the new receiver's `receiver.created` before it
            // answers the create: the own-event guard must know the id from the
            // create's answer on, not only once the discovery is over.
            let created = |id: &str| {
                if own {
                    shared.own.insert(id);
                }
            };
            match shared
                .client
                .rediscover_receiver_with(&stale, &created)
                .await
            {
                Ok(Some(new)) if new != stale => {
                    // Before the first post under the new id, as above.
                    if own {
                        shared.own.insert(&new);
                    }
                    let before = shared
                        .moved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(stale.clone(), new.clone());
                    // Every posting task with a record for the stale id gets
                    // here from the one shared discovery: log it once.
                    if before.as_deref() != Some(new.as_str()) {
                        tracing::warn!(
                            stale = %stale, receiver = %new,
                            "Receiver came back 404: discovered again."
                        );
                    }
                    record.work.receiver_id = new;
                    let body = encode(record, buf)?;
                    post(shared, body, &record.work.work_id, trace)
                        .await
                        .map_err(Posted::into_report)
                }
                Ok(_) => Err(e),
                Err(discovery) => {
                    tracing::error!(error = %ErrorChain(&discovery), "Rediscovering the receiver failed.");
                    Err(e)
                }
            }
        }
        other => other.map_err(Posted::into_report),
    }
}

fn moved_receiver(shared: &Shared, receiver_id: &str) -> Option<String> {
    let moved = shared.moved.lock().unwrap_or_else(|p| p.into_inner());
    if moved.is_empty() {
        return None;
    }
    // Follow the chain: a receiver may move more than once.
    let mut id = moved.get(receiver_id)?;
    for _ in 0..moved.len() {
        match moved.get(id) {
            Some(next) => id = next,
            None => break,
        }
    }
    Some(id.clone())
}

/// The record's body in the contract's JSON, written into `buf`.
fn encode(record: &Record, buf: &mut BytesMut) -> Result<Bytes, ReportError> {
    let error = record
        .error
        .as_ref()
        .map_or((UNSPECIFIED_ERROR, UNSPECIFIED_ERROR_CODE), |(m, c)| {
            (m.as_str(), c.as_str())
        });
    let phase = Phase::new(record.status, error);
    buf.reserve(BODY_CAPACITY);
    let body = LifecycleBody::new(record.work.as_ref(), phase, &record.details);
    serde_json::to_writer((&mut *buf).writer(), &body).map_err(|e| ReportError::Failed {
        attempts: 0,
        reason: "cannot encode the lifecycle body".into(),
        retryable: false,
        source: Some(Arc::new(ClientError::json(e))),
    })?;
    Ok(buf.split().freeze())
}

/// A `failed` record's error when its submitter gave none: XZepr needs both fields.
const UNSPECIFIED_ERROR: &str = "work failed";
const UNSPECIFIED_ERROR_CODE: &str = "unspecified";

/// How a post ended, when it did not succeed.
enum Posted {
    /// A 404 on the first attempt: the receiver may be gone (XZepr restarted).
    NotFound(ReportError),
    Failed(ReportError),
}

impl Posted {
    fn into_report(self) -> ReportError {
        match self {
            Posted::NotFound(e) | Posted::Failed(e) => e,
        }
    }
}

/// Sends one body with retries, the breaker and the rate limit.
async fn post(
    shared: &Shared,
    body: Bytes,
    work_id: &str,
    trace: Option<&crate::trace::TraceContext>,
) -> Result<String, Posted> {
    let cfg = &shared.config;
    let mut attempt = 0u32;
    let mut lost = false;
    loop {
        attempt += 1;
        wait_rate(shared).await;
        let Some(permit) = shared.breaker.admit(cfg, &shared.closing).await else {
            // Held for a refusal when the reporter closed: waiting cannot help.
            return Err(Posted::Failed(ReportError::Closed));
        };
        if lost {
            shared
                .stats
                .resent_after_lost_response
                .fetch_add(1, Relaxed);
            tracing::warn!(
                work_id,
                attempt,
                "Lifecycle post re-sent after a lost response: XZepr may hold it twice, \
                 both with the same post_key."
            );
        }
        let slot = shared.limiter.acquire().await;
        let result = shared.client.post_event_body(body.clone(), trace).await;
        slot.release(limit_outcome(&result));
        let answer = match &result {
            Ok(_) => Answer::Answered,
            Err(ClientError::Unauthorized { status }) => {
                shared.stats.unauthorized_answers.fetch_add(1, Relaxed);
                Answer::Refused { status: *status }
            }
            Err(e) if e.is_retryable() => Answer::Unreachable,
            Err(_) => Answer::Answered,
        };
        shared.breaker.record(permit, answer, cfg, &shared.stats);
        match result {
            Ok(id) => {
                shared.stats.posted.fetch_add(1, Relaxed);
                return Ok(id);
            }
            Err(e) => {
                let retryable = e.is_retryable();
                lost = e.is_response_lost();
                if !retryable || attempt >= cfg.max_attempts {
                    let not_found = e.is_not_found();
                    // A 404 is not logged: the receiver is found again.
                    if e.is_unauthorized() {
                        // Logged once per refusal by the gate, not per post.
                        tracing::debug!(work_id, error = %ErrorChain(&e), "Lifecycle post refused.");
                    } else if !not_found {
                        tracing::error!(work_id, error = %ErrorChain(&e), attempt, "Lifecycle post failed.");
                    }
                    let err = match &e {
                        ClientError::Api(api) if rejects_for_good(api.status) => {
                            ReportError::Rejected {
                                status: api.status,
                                reason: e.to_string().into(),
                                body: api.body.as_str().into(),
                            }
                        }
                        _ => ReportError::Failed {
                            attempts: attempt,
                            reason: if retryable {
                                "retries exhausted".into()
                            } else {
                                "refused".into()
                            },
                            retryable,
                            source: Some(Arc::new(e)),
                        },
                    };
                    if not_found {
                        return Err(Posted::NotFound(err));
                    }
                    shared.stats.failed.fetch_add(1, Relaxed);
                    return Err(Posted::Failed(err));
                }
                shared.stats.retries.fetch_add(1, Relaxed);
                tokio::time::sleep(backoff(cfg, attempt, &e)).await;
            }
        }
    }
}

/// What a post's answer says about XZepr's load: 429/503 and timeouts are
/// overload, an answer's latency counts, a connection that failed says nothing.
fn limit_outcome(result: &Result<String, ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) if e.is_timeout() => Outcome::Timeout,
        Err(e) => match e.status() {
            Some(status) => Outcome::of_status(status, e.retry_after()),
            None => Outcome::Ignored,
        },
    }
}

/// A 4xx that sending again cannot fix. 401 and 403 are the credentials (fixed
/// by the operator), 404 the receiver (found again), 429 the rate: all pass.
fn rejects_for_good(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 404 | 429)
}

/// Exponential backoff with full jitter: attempt `n` waits a random time up to
/// `backoff_base × 2^(n-1)`, capped at `backoff_max`. A server's `Retry-After` is
/// a floor (up to a minute).
fn backoff(cfg: &ReporterConfig, attempt: u32, err: &ClientError) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = exp.min(cfg.backoff_max);
    let jitter: f64 = rand::random();
    let wait = cap.mul_f64(jitter);
    match err.retry_after() {
        Some(asked) => wait.max(asked.min(Duration::from_secs(60))),
        None => wait,
    }
}

async fn wait_rate(shared: &Shared) {
    let Some(rate) = shared.config.rate_limit.filter(|r| *r > 0) else {
        return;
    };
    let slot = {
        let mut next = shared.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let slot = (*next).max(now);
        *next = slot + Duration::from_secs_f64(1.0 / f64::from(rate));
        slot
    };
    let now = Instant::now();
    if slot > now {
        tokio::time::sleep(slot - now).await;
    }
}
