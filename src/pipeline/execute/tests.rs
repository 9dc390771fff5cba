//! Unit tests of the executors and the one event flow they run.
use super::*;
use crate::decode::DecoderConfig;
use crate::dispatch::TypeFilter;
use crate::handler::BoxFuture;
use crate::pipeline::complete::{
    AckFn, Acked, Delivery, Lifecycle, LifecycleSink, MalformedPolicy, SharedSink, Status,
};
use crate::pipeline::flow::run_event;
use crate::pipeline::guard::Guard;
use crate::pipeline::retry::RetryPolicy;
use serde_json::json;
use std::sync::Mutex as StdMutex;

struct TestDelivery {
    offset: i64,
    payload: Vec<u8>,
    finished: Arc<StdMutex<Vec<(i64, bool)>>>,
    /// Cleared to revoke the delivery's partition.
    current: Arc<std::sync::atomic::AtomicBool>,
}

impl Delivery for TestDelivery {
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
        self.offset
    }
    fn payload(&self) -> Option<&[u8]> {
        Some(&self.payload)
    }
    fn headers(&self) -> Vec<(&str, &[u8])> {
        Vec::new()
    }
    fn is_current(&self) -> bool {
        self.current.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn finish(self) {
        self.finished.lock().unwrap().push((self.offset, true));
    }
    fn hold(self) {
        self.finished.lock().unwrap().push((self.offset, false));
    }
}

/// Holds acks until released, to prove an offset waits for its posts.
#[derive(Default)]
struct HeldSink {
    held: StdMutex<Vec<(Lifecycle, AckFn)>>,
}

impl LifecycleSink for HeldSink {
    fn submit(&self, record: Lifecycle, ack: AckFn) -> BoxFuture<()> {
        self.held.lock().unwrap().push((record, ack));
        Box::pin(async {})
    }
}

fn event(ty: &str, source: &str) -> Vec<u8> {
    format!(r#"{{"id":"e1","source":"{source}","specversion":"1.0.1","type":"{ty}","platform_id":"linux"}}"#)
        .into_bytes()
}

fn shared(sink: Option<Arc<HeldSink>>, filter: TypeFilter, policy: MalformedPolicy) -> Shared {
    Shared {
        filter,
        own_receiver: Some({
            let own = crate::dispatch::OwnReceivers::new();
            own.insert("ME");
            own
        }),
        lifecycle: sink.map(|s| s as SharedSink),
        metrics: Arc::new(Metrics::default()),
        malformed: policy,
        handler_timeout: None,
        idempotency: None,
        retry: RetryPolicy::none(),
        dead_letters: None,
        delays: None,
        tail_room: Arc::new(tokio::sync::Semaphore::new(1)),
        spans: None,
    }
}

type Finished = Arc<StdMutex<Vec<(i64, bool)>>>;

fn deliveries(payloads: Vec<Vec<u8>>) -> (Vec<TestDelivery>, Finished) {
    let finished = Arc::new(StdMutex::new(Vec::new()));
    let ds = payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| TestDelivery {
            offset: i as i64,
            payload,
            finished: Arc::clone(&finished),
            current: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
        .collect();
    (ds, finished)
}

fn run_sync(payloads: Vec<Vec<u8>>, shared: &Shared) -> Finished {
    let handler = |ev: &CloudEvent<'_>, work: &mut Work<'_>| -> Result<(), String> {
        work.detail("seen", ev.event_type());
        match ev.event_type() {
            "fail" => Err("it failed".to_owned()),
            "panic" => panic!("handler bug"),
            _ => Ok(()),
        }
    };
    let (ds, finished) = deliveries(payloads);
    let attempts = SyncAttempts {
        handler: Arc::new(handler),
        live: Arc::default(),
    };
    for d in ds {
        flow_sync(d, &attempts, shared);
    }
    finished
}

/// One event's flow with a sync handler, as a worker runs it.
fn flow_sync<H: Handler>(d: TestDelivery, attempts: &SyncAttempts<H>, shared: &Shared) {
    let pool = Decoder::new(DecoderConfig::default()).unwrap();
    let own = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&own, run_event(d, attempts, shared, &pool));
}

fn done(f: &Finished) -> Vec<i64> {
    let mut v: Vec<i64> = f
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.1)
        .map(|x| x.0)
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn offsets_finish_only_after_both_posts_are_acknowledged() {
    let sink = Arc::new(HeldSink::default());
    let sh = shared(
        Some(Arc::clone(&sink)),
        TypeFilter::any(),
        MalformedPolicy::Skip,
    );
    let finished = run_sync(vec![event("ok", "x"), event("fail", "x")], &sh);
    assert!(
        finished.lock().unwrap().is_empty(),
        "finished before any ack"
    );
    let held: Vec<_> = std::mem::take(&mut *sink.held.lock().unwrap());
    let statuses: Vec<_> = held.iter().map(|(r, _)| r.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Started,
            Status::Completed,
            Status::Started,
            Status::Failed
        ]
    );
    assert_eq!(held[1].0.details, json!({"seen": "ok"}));
    assert_eq!(
        held[3].0.error,
        Some(("it failed".to_owned(), "handler_error".to_owned()))
    );
    let mut acks = held.into_iter().map(|(_, a)| a);
    // Ack the first event's completed before its started: order does not matter.
    let (a0, a1) = (acks.next().unwrap(), acks.next().unwrap());
    a1.send(Acked::Ok);
    assert!(finished.lock().unwrap().is_empty());
    a0.send(Acked::Ok);
    assert_eq!(*finished.lock().unwrap(), vec![(0, true)]);
    // A post that exhausted its retries holds its offset.
    acks.next().unwrap().send(Acked::Ok);
    acks.next().unwrap().send(Acked::Failed);
    assert_eq!(*finished.lock().unwrap(), vec![(0, true), (1, false)]);
    let m = sh.metrics.snapshot();
    assert_eq!(
        (m.handled, m.handler_failed, m.report_failed, m.finished),
        (2, 1, 1, 1)
    );
}

#[test]
fn filtered_own_and_malformed_finish_at_once_and_panics_fail() {
    let sink = Arc::new(HeldSink::default());
    let filter = TypeFilter::any().prefix("deployment.").prefix("panic");
    let sh = shared(Some(Arc::clone(&sink)), filter, MalformedPolicy::Skip);
    let payloads = vec![
        event("deployment.x", "xzepr.event.receiver.OTHER"),
        event("other.type", "x"),
        event("deployment.y", "xzepr.event.receiver.ME"),
        b"{not json".to_vec(),
        event("panic", "x"),
    ];
    let finished = run_sync(payloads, &sh);
    assert_eq!(done(&finished), vec![1, 2, 3]);
    let m = sh.metrics.snapshot();
    assert_eq!(
        (m.filtered, m.own_skipped, m.malformed, m.handler_failed),
        (1, 1, 1, 1)
    );
    let held = std::mem::take(&mut *sink.held.lock().unwrap());
    assert_eq!(held.len(), 4);
    assert_eq!(held[3].0.error.as_ref().unwrap().1, "handler_panic");
    for (_, ack) in held {
        ack.send(Acked::Ok);
    }
    assert_eq!(done(&finished), vec![0, 1, 2, 3, 4]);
}

#[test]
fn the_hold_policy_holds_a_malformed_offset() {
    let sh = shared(None, TypeFilter::any(), MalformedPolicy::Hold);
    let finished = run_sync(vec![b"{broken".to_vec(), event("ok", "x")], &sh);
    assert_eq!(*finished.lock().unwrap(), vec![(0, false), (1, true)]);
    assert_eq!(sh.metrics.snapshot().malformed, 1);
}

/// Waits until exactly `offsets` finished (marks settle on the runtime).
fn wait_done(f: &Finished, offsets: &[i64]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while done(f) != offsets {
        assert!(Instant::now() < deadline, "finished {:?}", done(f));
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn guarded(sh: &mut Shared, rt: &tokio::runtime::Runtime) -> crate::idempotency::MemoryStore {
    let store = crate::idempotency::MemoryStore::new();
    sh.idempotency = Some(Guard {
        store: Arc::new(store.clone()),
        key: super::super::IdempotencyKey::EventId,
        runtime: rt.handle().clone(),
        remote: true,
    });
    store
}

fn begin_now(
    rt: &tokio::runtime::Runtime,
    store: &crate::idempotency::MemoryStore,
) -> crate::idempotency::Begin {
    use crate::idempotency::IdempotencyStore;
    rt.block_on(store.begin("e1")).unwrap()
}

#[test]
fn a_guarded_key_runs_once_and_is_marked_only_after_its_posts() {
    use crate::idempotency::Begin;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = Arc::new(HeldSink::default());
    let mut sh = shared(
        Some(Arc::clone(&sink)),
        TypeFilter::any(),
        MalformedPolicy::Skip,
    );
    let store = guarded(&mut sh, &rt);
    // Every test event has the id `e1`: the first is handled; while its
    // posts are unacknowledged the key stays claimed, not processed.
    let finished = run_sync(vec![event("ok", "x")], &sh);
    assert!(matches!(begin_now(&rt, &store), Begin::Busy));
    for (_, ack) in std::mem::take(&mut *sink.held.lock().unwrap()) {
        ack.send(Acked::Ok);
    }
    // The mark is written on the runtime, then the offset finishes.
    wait_done(&finished, &[0]);
    assert!(matches!(begin_now(&rt, &store), Begin::AlreadyProcessed));
    // Replays finish at once: no handler, no posts.
    let replay = run_sync(vec![event("ok", "x"), event("fail", "x")], &sh);
    assert_eq!(done(&replay), vec![0, 1]);
    assert!(sink.held.lock().unwrap().is_empty());
    let m = sh.metrics.snapshot();
    assert_eq!((m.handled, m.duplicates), (1, 2));
}

#[test]
fn a_failed_guarded_work_releases_its_key_for_the_replay() {
    use crate::idempotency::Begin;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sh = shared(None, TypeFilter::any(), MalformedPolicy::Skip);
    let store = guarded(&mut sh, &rt);
    let finished = run_sync(vec![event("fail", "x")], &sh);
    // Failed and (without a lifecycle) finished at once; the key is free.
    assert_eq!(done(&finished), vec![0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match begin_now(&rt, &store) {
            Begin::Run(claim) => {
                drop(claim);
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "key not released: {other:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let replay = run_sync(vec![event("ok", "x")], &sh);
    let m = sh.metrics.snapshot();
    assert_eq!((m.handled, m.handler_failed, m.duplicates), (2, 1, 0));
    wait_done(&replay, &[0]);
}

#[tokio::test(start_paused = true)]
async fn an_async_handler_past_its_timeout_fails_with_code_timeout_and_panics_fail() {
    let sink = Arc::new(HeldSink::default());
    let mut sh = shared(
        Some(Arc::clone(&sink)),
        TypeFilter::any(),
        MalformedPolicy::Skip,
    );
    sh.handler_timeout = Some(Duration::from_millis(100));
    let handler = |m: crate::decode::CloudEventMessage, _info: crate::handler::WorkInfo| async move {
        match m.event_type.as_str() {
            "slow" => tokio::time::sleep(Duration::from_secs(3600)).await,
            "panic" => panic!("async handler bug"),
            _ => {}
        }
        Ok::<_, String>(json!({"ok": true}))
    };
    let pool = Decoder::new(DecoderConfig::default()).unwrap();
    let attempts = AsyncAttempts {
        handler: Arc::new(handler),
        limit: None,
    };
    let (ds, finished) = deliveries(vec![
        event("slow", "x"),
        event("panic", "x"),
        event("fine", "x"),
    ]);
    for d in ds {
        run_event(d, &attempts, &sh, &pool).await;
    }
    let held = std::mem::take(&mut *sink.held.lock().unwrap());
    let terminal: Vec<_> = held
        .iter()
        .filter(|(r, _)| r.status != Status::Started)
        .map(|(r, _)| (r.status, r.error.as_ref().map(|e| e.1.clone())))
        .collect();
    assert_eq!(
        terminal,
        [
            (Status::Failed, Some("timeout".to_owned())),
            (Status::Failed, Some("handler_panic".to_owned())),
            (Status::Completed, None)
        ]
    );
    for (_, ack) in held {
        ack.send(Acked::Ok);
    }
    assert_eq!(done(&finished), vec![0, 1, 2]);
    assert_eq!(sh.metrics.snapshot().handler_timeouts, 1);
}

/// The retry state of an event lives in its flow: a partition revoked while
/// the event waits for its next attempt ends that flow, and the event of the
/// next assignment starts from its first attempt with its own `started`.
#[tokio::test(start_paused = true)]
async fn an_event_revoked_between_attempts_is_not_retried_and_a_reassigned_one_starts_afresh() {
    let sink = Arc::new(HeldSink::default());
    let mut sh = shared(
        Some(Arc::clone(&sink)),
        TypeFilter::any(),
        MalformedPolicy::Skip,
    );
    sh.retry = RetryPolicy::attempts(3).backoff(Duration::from_secs(1), Duration::from_secs(1));
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let handler = move |_m: crate::decode::CloudEventMessage, _info: crate::handler::WorkInfo| {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                Err("the first attempt fails".to_owned())
            } else {
                Ok(json!({}))
            }
        }
    };
    let pool = Arc::new(Decoder::new(DecoderConfig::default()).unwrap());
    let attempts = Arc::new(AsyncAttempts {
        handler: Arc::new(handler),
        limit: None,
    });
    let sh = Arc::new(sh);
    let (mut ds, finished) = deliveries(vec![event("x", "x")]);
    let first = ds.remove(0);
    let revoke = Arc::clone(&first.current);
    let flow = tokio::spawn({
        let (attempts, sh, pool) = (Arc::clone(&attempts), Arc::clone(&sh), Arc::clone(&pool));
        async move { run_event(first, &*attempts, &sh, &pool).await }
    });
    // The first attempt failed and the flow waits out its backoff.
    while calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    revoke.store(false, std::sync::atomic::Ordering::SeqCst);
    flow.await.unwrap();
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried once revoked"
    );
    assert_eq!(sh.metrics.snapshot().stale_dropped, 1);
    assert!(
        finished.lock().unwrap().is_empty(),
        "a revoked offset is never finished"
    );
    let statuses: Vec<_> = sink
        .held
        .lock()
        .unwrap()
        .iter()
        .map(|(r, _)| r.status)
        .collect();
    assert_eq!(
        statuses,
        [Status::Started],
        "no terminal post for a revoked event"
    );

    // The same offset of the next assignment: one attempt, its own started.
    let (mut again, finished) = deliveries(vec![event("x", "x")]);
    run_event(again.remove(0), &*attempts, &sh, &pool).await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let held = std::mem::take(&mut *sink.held.lock().unwrap());
    let statuses: Vec<_> = held.iter().map(|(r, _)| r.status).collect();
    assert_eq!(
        statuses,
        [Status::Started, Status::Started, Status::Completed]
    );
    for (_, ack) in held {
        ack.send(Acked::Ok);
    }
    assert_eq!(done(&finished), vec![0]);
}
