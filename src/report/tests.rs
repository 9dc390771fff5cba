//! Unit tests of the reporter: admission, ordering, own receivers, logging.
use std::sync::atomic::Ordering::Relaxed;

use serde_json::Value;

use super::dedup::Admission;
use super::*;
use crate::config::ConfigError;

fn record(work_id: &str, status: Status, acks: &Arc<Mutex<Vec<String>>>) -> Record {
    let acks = Arc::clone(acks);
    let tag = format!("{work_id}:{status:?}");
    Record {
        work: OwnedWork::new("R", work_id, "w", "1", "p", "svc"),
        status,
        details: Value::Null,
        error: None,
        trace: None,
        ack: Ack::new(move |r| acks.lock().unwrap().push(format!("{tag}:{}", r.is_ok()))),
    }
}

#[test]
fn duplicates_in_flight_park_and_terminals_wait_for_started() {
    let acks = Arc::default();
    let mut st = DedupState::default();
    assert!(matches!(
        st.admit(record("a", Status::Started, &acks)),
        Admission::Post(_)
    ));
    // The same key while in flight: parked on it, not posted twice.
    assert!(matches!(
        st.admit(record("a", Status::Started, &acks)),
        Admission::Parked
    ));
    assert_eq!(st.in_flight[&("a".to_owned(), Status::Started)].len(), 1);
    // A terminal waits for its `started`.
    assert!(matches!(
        st.admit(record("a", Status::Completed, &acks)),
        Admission::Parked
    ));
    assert_eq!(st.waiting["a"].len(), 1);
    // Another work id is independent.
    assert!(matches!(
        st.admit(record("b", Status::Completed, &acks)),
        Admission::Post(_)
    ));
    st.remember(
        &ReporterConfig::default(),
        ("c".to_owned(), Status::Started),
        "E9",
    );
    match st.admit(record("c", Status::Started, &acks)) {
        Admission::Done(_, Ok(id)) => assert_eq!(id, "E9"),
        _ => panic!("an acknowledged key is coalesced with its event id"),
    }
}

#[test]
fn a_terminal_after_a_failed_started_is_failed_unsent() {
    let acks: Arc<Mutex<Vec<String>>> = Arc::default();
    let cfg = ReporterConfig::default();
    let mut st = DedupState::default();
    st.started_ended(&cfg, "a", false);
    assert!(matches!(
        st.admit(record("a", Status::Completed, &acks)),
        Admission::WithoutStarted(_)
    ));
    assert!(matches!(
        st.admit(record("a", Status::Failed, &acks)),
        Admission::WithoutStarted(_)
    ));
    // A replayed `started` goes out; its terminal waits for it, and once it is
    // acknowledged the work is in order again.
    assert!(matches!(
        st.admit(record("a", Status::Started, &acks)),
        Admission::Post(_)
    ));
    assert!(matches!(
        st.admit(record("a", Status::Completed, &acks)),
        Admission::Parked
    ));
    st.in_flight.clear();
    st.started_ended(&cfg, "a", true);
    assert!(matches!(
        st.admit(record("a", Status::Completed, &acks)),
        Admission::Post(_)
    ));
    // Bounded: the oldest failed work ids are forgotten first.
    let small = ReporterConfig {
        failed_starts_capacity: 2,
        ..ReporterConfig::default()
    };
    for w in ["x", "y", "z"] {
        st.started_ended(&small, w, false);
    }
    assert_eq!(st.failed_starts.len(), 2);
    assert!(!st.failed_starts.contains("x"));
}

#[tokio::test]
async fn the_reporter_hands_out_one_shared_set() {
    let client = XzeprClient::new(crate::client::XzeprClientConfig::new(
        "http://127.0.0.1:9",
        "",
    ))
    .unwrap();
    let (reporter, _task) = Reporter::start(client, ReporterConfig::default());
    reporter.own_receivers().insert("R1");
    assert!(reporter.clone().own_receivers().contains("R1"));
}

#[test]
fn work_fields_must_not_be_empty() {
    assert!(validate_work_fields("deploy", "1.0.0", "1.0.0", "deployer").is_ok());
    for (args, field) in [
        (["", "1", "1", "p"], "work_name"),
        (["w", " ", "1", "p"], "work_version"),
        (["w", "1", "", "p"], "release"),
        (["w", "1", "1", "\t"], "package"),
    ] {
        let err = validate_work_fields(args[0], args[1], args[2], args[3]).unwrap_err();
        assert!(
            matches!(err, ConfigError::Empty { name } if name == field),
            "{err:?}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn a_dropped_record_acknowledges_closed() {
    let acks: Arc<Mutex<Vec<String>>> = Arc::default();
    drop(record("a", Status::Started, &acks));
    assert_eq!(*acks.lock().unwrap(), ["a:Started:false"]);
}

/// Counts the events whose message contains `needle`.
pub(super) struct CountMessages {
    pub(super) needle: &'static str,
    pub(super) hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl tracing::Subscriber for CountMessages {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Find<'a>(&'a str, bool);
        impl tracing::field::Visit for Find<'_> {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" && format!("{v:?}").contains(self.0) {
                    self.1 = true;
                }
            }
        }
        let mut find = Find(self.needle, false);
        event.record(&mut find);
        if find.1 {
            self.hits.fetch_add(1, Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Every posting task with a record for the lost receiver shares one
/// rediscovery; it is logged once, not once per task.
#[tokio::test]
async fn a_rediscovery_is_logged_once_however_many_tasks_share_it() {
    use serde_json::json;
    use wiremock::matchers::{body_partial_json, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let hits = Arc::default();
    // On this (the only) runtime thread: the posting tasks run here.
    let _log = tracing::subscriber::set_default(CountMessages {
        needle: "came back 404: discovered again",
        hits: Arc::clone(&hits),
    });
    let server = MockServer::start().await;
    let listed = |id: &str| {
        json!({"data": [{"id": id, "name": "svc", "type": "worker", "version": "1.0.0",
            "description": "", "schema": {}, "fingerprint": "f",
            "created_at": "2026-11-23T00:00:00Z"}],
            "pagination": {"limit": 50, "offset": 0, "total": 1, "has_more": false}})
    };
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(listed("R-OLD")))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(listed("R-NEW")))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .and(body_partial_json(json!({"event_receiver_id": "R-OLD"})))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": "not_found"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": "E1"})))
        .mount(&server)
        .await;
    let client =
        XzeprClient::new(crate::client::XzeprClientConfig::new(server.uri(), "tok")).unwrap();
    let receiver = client
        .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
        .await
        .unwrap();
    assert_eq!(receiver, "R-OLD");
    let config = ReporterConfig {
        concurrency: crate::flow_control::Concurrency::Fixed(16),
        ..ReporterConfig::default()
    };
    let (reporter, task) = Reporter::start(client, config);
    let acks: Arc<Mutex<Vec<String>>> = Arc::default();
    for i in 0..32 {
        let mut r = record(&format!("w-{i}"), Status::Started, &acks);
        r.work.receiver_id = "R-OLD".into();
        reporter.send(r).await.unwrap();
    }
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    assert!(acks.lock().unwrap().iter().all(|a| a.ends_with(":true")));
    assert_eq!(hits.load(Relaxed), 1, "one log line per rediscovery");
}
