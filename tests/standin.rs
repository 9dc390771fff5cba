//! The dev stack's XZepr stand-in, driven through our own client.
#![cfg(feature = "dev-stack")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use xzepr_consumer::client::{ClientError, XzeprClient, XzeprClientConfig};
use xzepr_consumer::decode::{Decoder, DecoderConfig};
use xzepr_consumer::devstack::{EventSink, StandIn};

#[derive(Default)]
struct Collect(Mutex<Vec<(String, Vec<u8>)>>);

struct Sink(Arc<Collect>);

impl EventSink for Sink {
    fn publish(&self, key: &str, payload: Vec<u8>) {
        self.0 .0.lock().unwrap().push((key.to_owned(), payload));
    }
}

#[tokio::test]
async fn receivers_events_errors_and_publication_follow_the_contract() {
    let sink = Arc::new(Collect::default());
    let standin = StandIn::start(
        "tok",
        Duration::from_millis(50),
        Arc::new(Sink(Arc::clone(&sink))),
    )
    .await
    .unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), "tok")).unwrap();
    let rid = client
        .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
        .await
        .unwrap();
    // Same name and type again: already exists, discovery finds it.
    let e = client
        .create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api(a) if a.status == 400 && a.body.contains("already exists")),
        "{e}"
    );
    client.forget_receiver("svc", "worker");
    assert_eq!(
        client
            .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
            .await
            .unwrap(),
        rid
    );
    assert_eq!(client.get_event_receiver(&rid).await.unwrap().name, "svc");

    let start = Instant::now();
    let id = client
        .post_work_started(&rid, "w-1", "deploy", "1.0.0", "linux", "svc", json!({}))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(50),
        "the latency setting applies"
    );
    assert_eq!(id.len(), 26);
    assert_eq!(
        standin
            .stats()
            .started
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Errors: unknown receiver 404, malformed receiver 400 with field, bad token 401.
    let e = client
        .post_work_started(
            "01ZZZZZZZZZZZZZZZZZZZZZZZZ",
            "w",
            "n",
            "1",
            "p",
            "s",
            json!({}),
        )
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = client
        .post_work_started("bad", "w", "n", "1", "p", "s", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api(a) if a.field.as_deref() == Some("event_receiver_id")),
        "{e}"
    );
    let bad = XzeprClient::new(XzeprClientConfig::new(standin.url(), "nope")).unwrap();
    assert!(bad
        .get_event_receiver(&rid)
        .await
        .unwrap_err()
        .is_unauthorized());

    // What was published decodes, and looks like the real server's messages.
    let published = sink.0.lock().unwrap().clone();
    assert_eq!(
        published.len(),
        2,
        "the receiver's system event and the work event"
    );
    let dec = Decoder::new(DecoderConfig::default()).unwrap();
    let sys = dec.decode(&published[0].1).unwrap();
    assert_eq!(sys.event_type(), "xzepr.event.receiver.created");
    assert_eq!(sys.package(), Some("xzepr.system"));
    assert_eq!(sys.source_receiver_id(), Some(rid.as_str()));
    assert_eq!(
        sys.entities().unwrap().event_receivers[0].receiver_type,
        "worker"
    );
    let work = dec.decode(&published[1].1).unwrap();
    assert_eq!(published[1].0, id);
    assert_eq!(
        (work.event_type(), work.id()),
        ("deploy.started", id.as_str())
    );
    assert_eq!(work.source_receiver_id(), Some(rid.as_str()));
    let owned = work.to_owned_message().unwrap();
    assert_eq!(owned.data.events[0].payload["work_id"], "w-1");
}
